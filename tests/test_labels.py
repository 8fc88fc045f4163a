"""Labels and batches on the tiny LLaVA: golden prompt + mask per template, train/serve prompt identity, truncation,
and a real forward/backward pass on a collated batch that mixes image and text-only rows."""

import copy
import logging

import pytest
from data_helpers import write_tiny_dataset

from train.artifact import configure_processor
from train.data import Example, load_examples, load_image
from train.labels import IGNORE_INDEX, ExampleDataset, LlavaCollator, RenderedSize, encode_example, image_token_count
from train.templates import V1_SYSTEM

TWO_TURNS = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A pie."}]},
    {"role": "user", "content": [{"type": "text", "text": "Title?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
]
EXAMPLE = Example(id="golden", image="x.png", messages=TWO_TURNS, row=1)


@pytest.fixture(scope="module")
def processor(tiny_artifact):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_artifact)


@pytest.fixture(scope="module")
def model(tiny_artifact):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(tiny_artifact)


@pytest.fixture()
def image():
    from PIL import Image

    return Image.new("RGB", (40, 20), (200, 30, 30))


def labelled_runs(processor, encoded):
    """The decoded text of each maximal run of labelled tokens."""
    runs, current = [], []
    for token, label in zip(encoded["input_ids"], encoded["labels"], strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [processor.tokenizer.decode(run) for run in runs]


def test_v1_golden_prompt_and_label_mask(processor, model, image):
    assert processor.apply_chat_template(TWO_TURNS, tokenize=False) == (
        V1_SYSTEM + " USER: <image>\nWhat is shown? ASSISTANT: A pie.</s>USER: Title? ASSISTANT: Yes.</s>")
    encoded = encode_example(processor, EXAMPLE, image, max_length=None)
    assert labelled_runs(processor, encoded) == [" A pie.</s>", " Yes.</s>"]
    ids, labels = encoded["input_ids"], encoded["labels"]
    image_positions = [i for i, t in enumerate(ids) if t == processor.image_token_id]
    assert len(image_positions) == image_token_count(processor) == model.config.image_seq_length == 16
    assert all(labels[i] == IGNORE_INDEX for i in image_positions)
    assert ids[0] == processor.tokenizer.bos_token_id and labels[0] == IGNORE_INDEX
    assert labels[-1] == processor.tokenizer.eos_token_id
    assert encoded["pixel_values"].shape == (1, 3, 32, 32) and encoded["truncated"] is False


@pytest.mark.parametrize(("version", "prompt_end", "runs"), [
    ("llava_llama_2", "<</SYS>>\n\n<image>\nWhat is shown? [/INST] A pie. </s><s>[INST] Title? [/INST] Yes. </s>",
     [" A pie. </s>", " Yes. </s>"]),
    ("plain", "<image>\nWhat is shown?\nA pie.</s>Title?\nYes.</s>", ["A pie.</s>", "Yes.</s>"]),
])
def test_llama_2_and_plain_label_masks(processor, image, version, prompt_end, runs):
    configured = configure_processor(copy.deepcopy(processor), version=version)
    assert configured.apply_chat_template(TWO_TURNS, tokenize=False).endswith(prompt_end)
    assert labelled_runs(configured, encode_example(configured, EXAMPLE, image, max_length=None)) == runs


def sentencepiece_style_processor(image_processor, version):
    """A Llama-style tokenizer (SentencePiece's word-start marker, no byte-level pre-tokenizer), as llava-hf uses."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import LlavaProcessor, PreTrainedTokenizerFast

    from demo.tiny import DEFAULT_CORPUS, SPECIAL_TOKENS

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    tok.train_from_iterator(DEFAULT_CORPUS + ["A pie. Yes. What is shown? Title?"],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return configure_processor(processor, version=version)


@pytest.mark.parametrize(("version", "expected"), [("v1", " A pie.</s> Yes.</s>"),
                                                   ("llava_llama_2", " A pie. </s> Yes. </s>")])
def test_label_mask_with_a_sentencepiece_style_tokenizer(processor, image, version, expected):
    sp = sentencepiece_style_processor(copy.deepcopy(processor.image_processor), version)
    encoded = encode_example(sp, EXAMPLE, image, max_length=None)
    labelled = sp.tokenizer.convert_ids_to_tokens([t for t in encoded["labels"] if t != IGNORE_INDEX])
    assert "".join(labelled).replace("\u2581", " ") == expected


def test_training_prompt_is_exactly_the_serving_prompt(processor, image):
    """The tokens before the first answer equal what serving feeds the model for that question."""
    prompt = processor.apply_chat_template(TWO_TURNS[:1], tokenize=False, add_generation_prompt=True)
    serving_ids = processor(text=[prompt], images=[image])["input_ids"][0]
    encoded = encode_example(processor, EXAMPLE, image, max_length=None)
    n = len(serving_ids)
    assert encoded["input_ids"][:n] == list(serving_ids)
    assert set(encoded["labels"][:n]) == {IGNORE_INDEX} and encoded["labels"][n] != IGNORE_INDEX


def test_text_only_example_has_no_image_tokens(processor):
    text_only = Example(id="t", image=None, messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                                                     {"role": "assistant", "content": "Hello"}], row=1)
    encoded = encode_example(processor, text_only, None, max_length=None)
    assert processor.image_token_id not in encoded["input_ids"] and encoded["pixel_values"] is None
    assert labelled_runs(processor, encoded) == [" Hello</s>"]


def test_image_and_row_must_agree(processor, image):
    with pytest.raises(ValueError, match="image given True, but the row has no image"):
        encode_example(processor, Example("t", None, TWO_TURNS[:2], 1), image, max_length=None)
    with pytest.raises(ValueError, match="image given False, but the row has image"):
        encode_example(processor, EXAMPLE, None, max_length=None)


def test_answers_without_eos_are_refused(processor, image):
    broken = copy.deepcopy(processor)
    broken.chat_template = processor.chat_template.replace("'</s>'", "'.'")
    with pytest.raises(ValueError, match="answer 1 does not end with the EOS token"):
        encode_example(broken, EXAMPLE, image, max_length=None)


def test_template_without_generation_blocks_is_refused(processor, image):
    broken = copy.deepcopy(processor)
    broken.chat_template = processor.chat_template.replace("{%- generation -%}", "").replace(
        "{%- endgeneration -%}", "")
    with pytest.raises(ValueError, match=r"marks 0 answer span\(s\) for 2 assistant turn\(s\)"):
        encode_example(broken, EXAMPLE, image, max_length=None)


def test_truncation_cuts_from_the_end_and_never_through_the_image(processor, image):
    full = encode_example(processor, EXAMPLE, image, max_length=None)
    first_answer = full["labels"].index(processor.tokenizer.convert_tokens_to_ids("</s>"))
    cut = encode_example(processor, EXAMPLE, image, max_length=first_answer + 3)
    assert cut["truncated"] and len(cut["input_ids"]) == first_answer + 3
    assert cut["input_ids"] == full["input_ids"][:first_answer + 3]
    assert labelled_runs(processor, cut)[0] == " A pie.</s>"
    last_image = max(i for i, t in enumerate(full["input_ids"]) if t == processor.image_token_id)
    assert encode_example(processor, EXAMPLE, image, max_length=last_image) is None  # would cut the image
    first_label = next(i for i, label in enumerate(full["labels"]) if label != IGNORE_INDEX)
    assert encode_example(processor, EXAMPLE, image, max_length=first_label) is None  # no answer token left
    assert encode_example(processor, EXAMPLE, image, max_length=first_label + 1)["truncated"]


@pytest.fixture(scope="module")
def tiny_examples(tmp_path_factory):
    data_path, image_folder = write_tiny_dataset(tmp_path_factory.mktemp("data"), n=8)
    return load_examples(data_path, image_folder), image_folder


@pytest.mark.parametrize("version", ["v1", "llava_llama_2", "plain"])
def test_rendered_size_without_rendering_matches_the_template(processor, version):
    configured = configure_processor(copy.deepcopy(processor), version=version)
    size = RenderedSize(configured)
    conversations = [TWO_TURNS, TWO_TURNS[:2], [{"role": "user", "content": "Caf\u00e9 \u2603?"},
                                                {"role": "assistant", "content": "Oui \u00e9t\u00e9."}],
                     [{"role": "system", "content": "Be brief."}, *TWO_TURNS[:2]]]
    for messages in conversations * 2:  # the second round hits the per-shape cache
        rendered = len(configured.apply_chat_template(messages, tokenize=False).encode())
        # exact, except that `plain` drops system messages: then it is an upper bound, still safe for max_length
        assert size(messages) == rendered or (version == "plain" and messages[0]["role"] == "system"
                                              and size(messages) > rendered)


def test_dataset_precheck_agrees_with_encoding_at_every_length(processor, tiny_examples):
    examples, image_folder = tiny_examples
    images = {e.id: load_image(image_folder / e.image) if e.image else None for e in examples}
    for max_length in range(20, 141, 6):
        dataset = ExampleDataset(examples, processor, max_length=max_length)
        encoded = {e.id: encode_example(processor, e, images[e.id], max_length=max_length) for e in examples}
        assert [e.id for e in dataset.examples] == [i for i, enc in encoded.items() if enc is not None]
        assert dataset.truncated == sum(enc["truncated"] for enc in encoded.values() if enc is not None)
        assert dataset.dropped == sum(enc is None for enc in encoded.values())


def test_dataset_logs_one_summary_line_and_signs_modality_lengths(processor, tiny_examples, caplog):
    examples, _ = tiny_examples
    caplog.set_level(logging.INFO, logger="train.labels")
    dataset = ExampleDataset(examples, processor, max_length=95)
    lines = [r.getMessage() for r in caplog.records if r.name == "train.labels"]
    assert lines == [f"max_length 95 (image tokens included): {dataset.truncated} of 8 examples truncated, "
                     f"{dataset.dropped} dropped (image or first answer beyond the limit)"]
    assert (dataset.truncated, dataset.dropped) == (4, 3)
    unlimited = ExampleDataset(examples, processor, max_length=None)
    assert len(unlimited) == 8 and unlimited[2] is examples[2]
    assert [n > 0 for n in unlimited.modality_lengths] == [e.image is not None for e in examples]
    assert all(n > 16 for n in unlimited.lengths if n)  # image rows count their 16 image tokens


def test_collated_mixed_batch_trains_the_tiny_model(processor, model, tiny_examples):
    import torch

    examples, image_folder = tiny_examples
    batch = LlavaCollator(processor, image_folder, max_length=512)(examples)
    image_rows = [e for e in examples if e.image is not None]
    assert batch["pixel_values"].shape == (len(image_rows), 3, 32, 32)
    for k, e in enumerate(image_rows):  # one pixel tensor per image row, in row order
        expected = processor.image_processor(load_image(image_folder / e.image), return_tensors="pt")["pixel_values"]
        assert torch.allclose(batch["pixel_values"][k], expected[0])
    n_image_tokens = (batch["input_ids"] == processor.image_token_id).sum(dim=1)
    assert n_image_tokens.tolist() == [16 if e.image else 0 for e in examples]
    lengths = batch["attention_mask"].sum(dim=1)
    for i, n in enumerate(lengths.tolist()):  # right padding: pad id, mask 0, label -100 after the text
        assert (batch["input_ids"][i, n:] == processor.tokenizer.pad_token_id).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all() and batch["attention_mask"][i, :n].all()
        assert batch["labels"][i, n - 1] == processor.tokenizer.eos_token_id
    model.train()
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad()


def test_collator_pads_to_a_multiple_and_drops_what_cannot_fit(processor, tiny_examples, caplog):
    examples, image_folder = tiny_examples
    batch = LlavaCollator(processor, image_folder, 512, pad_to_multiple_of=64)(examples[:3])
    assert batch["input_ids"].shape[1] % 64 == 0
    text_only = [e for e in examples if e.image is None]
    short = LlavaCollator(processor, image_folder, max_length=90)  # ex-0 answers at token 97; the text-only row fits
    batch = short([examples[0], text_only[0]])
    assert short.dropped == 1 and batch["input_ids"].shape[0] == 1 and "pixel_values" not in batch
    assert "dropped example 'ex-0'" in caplog.text
    with pytest.raises(ValueError, match="no example of this batch fits max_length=90"):
        short([examples[0]])
    with pytest.raises(ValueError, match="example 'ex-0' has an image but the collator has no image folder"):
        LlavaCollator(processor, None, 512)([examples[0]])


def test_modality_sampler_through_the_trainer_dataloader(processor, model, tmp_path):
    """TC's Trainer with --group_by_modality_length: every batch it loads is all-image or all-text, and the
    order changes from one epoch to the next."""
    from transformers import TrainingArguments

    from train.trainer import LlavaTrainer

    data_path, image_folder = write_tiny_dataset(tmp_path, n=12)  # 8 image rows, 4 text-only rows
    dataset = ExampleDataset(load_examples(data_path, image_folder), processor, max_length=512)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, use_cpu=True,
                             report_to=[], remove_unused_columns=False, seed=7)
    trainer = LlavaTrainer(model=model, args=args, train_dataset=dataset, group_by_modality=True,
                           data_collator=LlavaCollator(processor, image_folder, 512))
    from train.sampler import ModalityLengthGroupedSampler

    assert isinstance(trainer._get_train_sampler(), ModalityLengthGroupedSampler)
    loader = trainer.get_train_dataloader()
    orders = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == 6
        for batch in batches:
            image_rows = (batch["input_ids"] == processor.image_token_id).any(dim=1)
            assert image_rows.all() == ("pixel_values" in batch) and image_rows.any() == image_rows.all()
        orders.append([b["input_ids"].sum().item() for b in batches])
    assert orders[0] != orders[1]
