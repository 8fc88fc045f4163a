"""LLaVA data loading: every problem kind reported with its row, JSON and JSONL, <image> repair, the sampler."""

import json
import logging

import pytest
from data_helpers import tiny_rows, write_images, write_rows, write_tiny_dataset

from train import data as data_module
from train.data import DataError, Example, load_examples, load_image
from train.sampler import ModalityLengthGroupedSampler, grouped_indices

GOOD = {"id": "good", "image": "img_0.png",
        "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]}


def turns(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


def load_rows(tmp_path, rows, fmt="json", **kwargs):
    write_images(tmp_path / "images", 2)
    return load_examples(write_rows(tmp_path / f"d.{fmt}", rows, fmt), tmp_path / "images", **kwargs)


# One bad row after a good one: each problem kind is reported, with the bad row's number (2) and id.
BAD_ROWS = {
    "missing image": ({"id": "b", "image": "nope.png", "conversations": GOOD["conversations"]},
                      "row 2 (id 'b'): image 'nope.png' not found"),
    "turns do not alternate": ({"id": "b", "conversations": turns(("human", "Q"), ("human", "Q2"), ("gpt", "A"))},
                               "row 2 (id 'b'), turn 2: expected a gpt turn"),
    "starts with gpt": ({"id": "b", "conversations": turns(("gpt", "A"), ("human", "Q"))},
                        "row 2 (id 'b'), turn 1: expected a human turn"),
    "empty value": ({"id": "b", "conversations": turns(("human", "Q"), ("gpt", "  "))},
                    "row 2 (id 'b'), turn 2: empty or missing 'value'"),
    "missing value": ({"id": "b", "conversations": [{"from": "human"}, {"from": "gpt", "value": "A"}]},
                      "row 2 (id 'b'), turn 1: empty or missing 'value'"),
    "two images": ({"id": "b", "image": "img_1.png", "conversations": turns(("human", "<image><image> Q"),
                                                                             ("gpt", "A"))},
                   "row 2 (id 'b'): 2 <image> tokens; one image per row"),
    "<image> in a text-only row": ({"id": "b", "conversations": turns(("human", "<image>\nQ"), ("gpt", "A"))},
                                   "row 2 (id 'b'), turn 1: <image> in a row without an 'image'"),
    "<image> after the first turn": ({"id": "b", "image": "img_1.png",
                                      "conversations": turns(("human", "Q"), ("gpt", "A <image>"))},
                                     "row 2 (id 'b'), turn 2: <image> is only allowed in the first human turn"),
    "unknown from": ({"id": "b", "conversations": turns(("system", "Be brief"), ("gpt", "A"))},
                     "row 2 (id 'b'), turn 1: unknown 'from' 'system'"),
    "row not an object": (["human", "gpt"], "row 2: expected an object, got list"),
    "no conversations": ({"id": "b", "image": "img_1.png"}, "row 2 (id 'b'): 'conversations' must be a non-empty"),
    "turn not an object": ({"id": "b", "conversations": ["Q", {"from": "gpt", "value": "A"}]},
                           "row 2 (id 'b'), turn 1: expected an object"),
    "question without answer": ({"id": "b", "conversations": turns(("human", "Q"))},
                                "row 2 (id 'b'): the last turn is a question with no gpt answer"),
    "image not a string": ({"id": "b", "image": 7, "conversations": GOOD["conversations"]},
                           "row 2 (id 'b'): 'image' must be a non-empty string"),
}


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_each_problem_kind_is_reported_with_its_row(tmp_path, kind):
    row, expected = BAD_ROWS[kind]
    with pytest.raises(DataError) as err:
        load_rows(tmp_path, [GOOD, row])
    assert any(p.startswith(expected) for p in err.value.problems), err.value.problems
    assert expected in str(err.value)


def test_undecodable_image_is_reported(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    row = {**GOOD, "id": "b", "image": "bad.png"}
    with pytest.raises(DataError, match=r"row 2 \(id 'b'\): image 'bad.png' does not decode"):
        load_rows(tmp_path, [GOOD, row])


def test_a_file_with_many_problems_reports_all_of_them_in_row_order(tmp_path):
    rows = [GOOD, {"id": "x", "image": "gone.png", "conversations": GOOD["conversations"]},
            {"id": "y", "conversations": turns(("gpt", "A"), ("gpt", ""))}, GOOD, "oops",
            {"id": "z", "image": "img_1.png", "conversations": turns(("human", "<image><image>"), ("gpt", "A"))}]
    with pytest.raises(DataError) as err:
        load_rows(tmp_path, rows, fmt="jsonl")
    problems = err.value.problems
    assert [p.split(":")[0].split(",")[0] for p in problems] == [
        "row 2 (id 'x')", "row 3 (id 'y')", "row 3 (id 'y')", "row 5", "row 6 (id 'z')"]
    assert "5 problem(s)" in str(err.value)
    assert "turn 2: empty or missing 'value'" in problems[2]


def test_json_array_and_jsonl_give_the_same_examples(tmp_path):
    from_json = load_examples(*write_tiny_dataset(tmp_path / "a", fmt="json"))
    from_jsonl = load_examples(*write_tiny_dataset(tmp_path / "b", fmt="jsonl"))
    assert from_json == from_jsonl
    assert len(from_json) == 8 and sum(e.image is None for e in from_json) == 2


def test_conversion_to_chat_messages(tmp_path):
    row = {"id": 7, "image": "img_0.png",
           "conversations": turns(("human", "What is this?\n<image>"), ("gpt", "A pie."), ("human", "Sure?"),
                                  ("gpt", "Yes."))}
    text_row = {"conversations": turns(("human", "Hi"), ("gpt", "Hello"))}
    image_example, text_example = load_rows(tmp_path, [row, text_row])
    assert image_example == Example(id="7", image="img_0.png", row=1, messages=[
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A pie."}]},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]}])
    assert text_example.id == "2" and text_example.image is None  # no id: the row number stands in
    assert text_example.messages[0] == {"role": "user", "content": [{"type": "text", "text": "Hi"}]}


def test_missing_image_token_is_inserted_with_one_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="train.data")
    examples = load_examples(*write_tiny_dataset(tmp_path, n=8, image_token=False))
    warnings = [r.getMessage() for r in caplog.records if "no <image>" in r.getMessage()]
    assert warnings == ["6 image row(s) had no <image> in their first human turn; inserted it so the model "
                        "sees the image"]
    for e in examples:
        first = e.messages[0]["content"]
        assert (first[0] == {"type": "image"}) == (e.image is not None)


def test_duplicate_ids_warn_and_keep_the_rows(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="train.data")
    assert len(load_rows(tmp_path, [GOOD, GOOD, GOOD])) == 3
    assert "1 duplicate id(s) (kept all rows): 'good' x3" in caplog.text


@pytest.mark.parametrize(("text", "expected"), [
    ('[\n {"id": 1,\n  "conversations": [}\n]', "invalid JSON at line 3 column 21: Expecting value"),
    ("", "the file holds no examples"),
    ("[]", "the file holds no examples"),
])
def test_malformed_json_array_reports_line_and_column(tmp_path, text, expected):
    (tmp_path / "d.json").write_text(text)
    with pytest.raises(DataError) as err:
        load_examples(tmp_path / "d.json", tmp_path)
    assert err.value.problems[0].startswith(expected)


def test_every_malformed_jsonl_line_is_reported(tmp_path):
    good = json.dumps({"conversations": turns(("human", "Q"), ("gpt", "A"))})
    (tmp_path / "d.jsonl").write_text(f"{good}\n{{bad\n\n{good}\n[1,\n")
    with pytest.raises(DataError) as err:
        load_examples(tmp_path / "d.jsonl", None)
    assert [p.split(":")[0] for p in err.value.problems] == ["row 2", "row 5"]
    assert "invalid JSON at line 2 column 2" in err.value.problems[0]


def test_one_pretty_printed_object_and_non_utf8_files_are_explained(tmp_path):
    (tmp_path / "obj.json").write_text(json.dumps({"data": tiny_rows(2)}, indent=1))
    with pytest.raises(DataError, match="one JSON object spread over several lines; expected a JSON array"):
        load_examples(tmp_path / "obj.json", None)
    (tmp_path / "latin1.jsonl").write_bytes('{"conversations": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8 text \(bad byte at offset 22\)"):
        load_examples(tmp_path / "latin1.jsonl", None)


def test_missing_data_file_and_image_folder(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_examples(tmp_path / "nope.json", tmp_path)
    data_path = write_rows(tmp_path / "d.json", [GOOD])
    with pytest.raises(DataError, match="image folder .* not found, but 1 image"):
        load_examples(data_path, tmp_path / "no-images")
    assert len(load_examples(data_path, tmp_path / "no-images", check_images=False)) == 1


def test_a_missing_image_is_reported_with_the_absolute_path_it_was_looked_for_at(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data_path = write_rows(tmp_path / "d.json", [{**GOOD, "image": "gone.png"}])
    with pytest.raises(DataError) as err:
        load_examples("d.json", ".")  # the default image folder of a relative data path
    assert f"image 'gone.png' not found at {tmp_path.resolve() / 'gone.png'}" in str(err.value)
    assert data_path.is_file()


def test_image_check_shows_progress_on_large_sets(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data_module, "PROGRESS_MIN_IMAGES", 1)
    load_examples(*write_tiny_dataset(tmp_path, n=3))
    assert "checking images" in capsys.readouterr().err


def test_images_load_as_rgb_with_transparency_on_white(tmp_path):
    names = write_images(tmp_path, 5)  # RGB, RGBA (half-transparent green), L, P, RGB
    images = [load_image(tmp_path / n) for n in names]
    assert {im.mode for im in images} == {"RGB"}
    assert images[1].getpixel((0, 0)) == (142, 227, 142)  # 50% green over white, as the image processor does
    assert images[0].size == (48, 24)


# ---- --group_by_modality_length -------------------------------------------------------------------------------

def modality_of(lengths, indices):
    return {lengths[i] > 0 for i in indices}


def test_sampler_steps_hold_one_modality_and_similar_lengths():
    lengths = [10 + i for i in range(40)] + [-(5 + i) for i in range(24)]  # 40 image rows, 24 text-only
    order = grouped_indices(lengths, batch_size=4, world_size=2, seed=3)
    assert sorted(order) == list(range(64))
    steps = [order[k:k + 8] for k in range(0, 64, 8)]
    for step in steps:
        assert len(modality_of(lengths, step)) == 1
        # one mega-batch covers every row here, so a step is a run of the sorted lengths
        values = sorted(abs(lengths[i]) for i in step)
        assert values[-1] - values[0] == 7
    assert abs(lengths[order[0]]) == 49  # the longest step comes first


def test_sampler_leftovers_of_both_modalities_go_last():
    lengths = [3] * 5 + [-3] * 3
    order = grouped_indices(lengths, batch_size=2, seed=0)
    steps = [modality_of(lengths, order[k:k + 2]) for k in range(0, 6, 2)]
    assert sorted(map(sorted, steps)) == [[False], [True], [True]]  # two full image steps, one full text step
    assert modality_of(lengths, order[6:]) == {True, False}  # 1 image + 1 text left over, last


def test_sampler_is_deterministic_per_seed_and_reshuffles_per_epoch():
    lengths = [(i % 7) + 1 if i % 3 else -((i % 5) + 1) for i in range(60)]
    sampler = ModalityLengthGroupedSampler(lengths, 4, seed=1, mega_batch_steps=2)
    first = list(sampler)
    assert first == list(ModalityLengthGroupedSampler(lengths, 4, seed=1, mega_batch_steps=2))
    assert first != list(ModalityLengthGroupedSampler(lengths, 4, seed=2, mega_batch_steps=2))
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == sorted(first) and len(sampler) == 60
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_sampler_with_one_modality_groups_by_length_only():
    lengths = [5, 50, 6, 51, 7, 52, 8, 53]
    order = grouped_indices(lengths, batch_size=2, seed=0)
    batches = [sorted(lengths[i] for i in order[k:k + 2]) for k in range(0, 8, 2)]
    assert sorted(batches) == [[5, 6], [7, 8], [50, 51], [52, 53]]


def test_sampler_drives_a_dataloader_into_single_modality_batches():
    from torch.utils.data import DataLoader

    lengths = [4] * 12 + [-4] * 8
    loader = DataLoader(list(range(20)), batch_size=4, sampler=ModalityLengthGroupedSampler(lengths, 4, seed=5))
    assert all(len(modality_of(lengths, batch.tolist())) == 1 for batch in loader)


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="non-zero"):
        ModalityLengthGroupedSampler([3, 0], 2)
    with pytest.raises(ValueError, match="batch_size and world_size must be >= 1"):
        grouped_indices([1, 2], 0)
