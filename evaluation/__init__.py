"""The one evaluation path: questions -> answers through the serving engine (or a server) -> relaxed-accuracy report.

    questions = load_questions("data/validation/dataset.json")                 # evaluation/questions.py
    answer = engine_answerer(Predictor(load_artifact("out/")), max_new_tokens=16)  # evaluation/answerers.py
    report = evaluate(questions, {"fine_tuned": answer}, blank_control=True)   # evaluation/report.py

Every human/gpt pair of the LLaVA data is asked as one single-turn question about its image, the way a client asks
the served model; the blank-image control asks the same questions about a grey image. Both the training job's
`eval_report.json` and `llava-sm eval` come from here, so they measure the same thing.
"""
