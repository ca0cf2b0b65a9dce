"""albert-finetune: metrics against hand-computed values, the readers of every format, every bad-input message,
and real end-to-end runs on a tiny exported ALBERT (both rows, the very same folds for both models)."""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.model_fixtures import export_tiny_albert

from pipeline import finetune
from pipeline.classification_metrics import classification_scores, mean_std, paired_difference, summarise
from pipeline.finetune import (
    FinetuneSettings,
    ProbeConfig,
    load_albert_folder,
    main,
    make_splits,
    new_model,
    prepare_task,
)
from pipeline.finetune_report import write_results
from pipeline.labelled import Columns, LabelledDataError, class_order, read_labelled

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("transformers")
pytest.importorskip("sklearn")

# ---------------------------------------------------------------------------------------------------------------
# Metrics, against values computed by hand


def test_binary_scores_by_hand():
    y = [0, 0, 1, 1, 1]
    p1 = np.array([0.1, 0.6, 0.4, 0.8, 0.9])
    probs = np.stack([1 - p1, p1], axis=1)
    # predictions 0 1 0 1 1: TP 2 (rows 3, 4), FP 1 (row 1), FN 1 (row 2), TN 1 (row 0)
    # AUC: positives {0.4, 0.8, 0.9} vs negatives {0.1, 0.6}: 5 of the 6 pairs are ordered right
    scores = classification_scores(y, probs, positive=1)
    assert scores == pytest.approx(
        {"accuracy": 3 / 5, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "roc_auc": 5 / 6}
    )
    # class 0 as the positive one: predicted 0 at rows 0 and 2, of which row 0 is right; 1 of the 2 zeros found
    s0 = classification_scores(y, probs, positive=0)
    assert s0 == pytest.approx({"accuracy": 3 / 5, "precision": 1 / 2, "recall": 1 / 2, "f1": 1 / 2, "roc_auc": 5 / 6})


def test_binary_auc_counts_ties_as_half_and_nothing_predicted_as_zero():
    # positives {0.4, 0.4}, negatives {0.4, 0.3}: pairs 0.5 + 1 + 0.5 + 1 = 3 of 4; all predicted negative
    p1 = np.array([0.4, 0.4, 0.4, 0.3])
    scores = classification_scores([1, 1, 0, 0], np.stack([1 - p1, p1], axis=1), positive=1)
    assert scores["roc_auc"] == pytest.approx(3 / 4)
    assert (scores["precision"], scores["recall"], scores["f1"], scores["accuracy"]) == (0.0, 0.0, 0.0, 0.5)


def test_multiclass_macro_scores_by_hand():
    y = [0, 1, 2, 0, 1, 2]
    probs = np.array(
        [
            [0.7, 0.2, 0.1],  # -> 0 right
            [0.2, 0.5, 0.3],  # -> 1 right
            [0.1, 0.3, 0.6],  # -> 2 right
            [0.3, 0.4, 0.3],  # -> 1, is 0
            [0.5, 0.3, 0.2],  # -> 0, is 1
            [0.2, 0.2, 0.6],  # -> 2 right
        ]
    )
    # class 0: P 1/2 R 1/2, class 1: P 1/2 R 1/2, class 2: P 1 R 1 -> macro 2/3 each
    # one-vs-rest AUC: class 0: 7/8, class 1: 6.5/8 (one tie), class 2: 8/8 -> macro 2.6875 / 3
    scores = classification_scores(y, probs)
    expected = {"accuracy": 4 / 6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "roc_auc": 2.6875 / 3}
    assert scores == pytest.approx(expected)


def test_multiclass_f1_is_the_mean_of_the_per_class_f1():
    y = [0, 0, 1, 2, 2, 2]
    pred = [0, 1, 1, 2, 2, 0]
    probs = np.eye(3)[pred] * 0.8 + 0.2 / 3
    # class 0: P 1/2 R 1/2 F 1/2; class 1: P 1/2 R 1 F 2/3; class 2: P 1 R 2/3 F 4/5
    scores = classification_scores(y, probs)
    assert scores["precision"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    assert scores["recall"] == pytest.approx((1 / 2 + 1 + 2 / 3) / 3)
    assert scores["f1"] == pytest.approx((1 / 2 + 2 / 3 + 4 / 5) / 3)


def test_auc_is_nan_without_every_class_and_summaries_skip_it():
    probs = np.array([[0.2, 0.8], [0.6, 0.4]])
    assert math.isnan(classification_scores([1, 1], probs, positive=1)["roc_auc"])
    assert math.isnan(classification_scores([0, 1], np.array([[0.5, 0.3, 0.2], [0.1, 0.8, 0.1]]))["roc_auc"])
    assert mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}  # sample std
    assert mean_std([0.5]) == {"mean": 0.5, "std": 0.0, "n": 1}
    assert mean_std([1.0, math.nan, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2}
    rows_a = [{m: v for m in ("accuracy", "precision", "recall", "f1", "roc_auc")} for v in (0.6, 0.8)]
    rows_b = [{m: v for m in ("accuracy", "precision", "recall", "f1", "roc_auc")} for v in (0.5, 0.5)]
    assert summarise(rows_a)["f1"] == {"mean": pytest.approx(0.7), "std": pytest.approx(math.sqrt(0.02)), "n": 2}
    difference = paired_difference(rows_a, rows_b)["roc_auc"]
    assert difference["mean"] == pytest.approx(0.2) and difference["std"] == pytest.approx(math.sqrt(0.02))


def test_results_json_writes_undefined_values_as_null(tmp_path):
    write_results(tmp_path, {"summary": {"roc_auc": {"mean": math.nan, "std": math.nan, "n": 0}}, "runs": [1.5]})
    assert json.loads((tmp_path / "results.json").read_text()) == {
        "summary": {"roc_auc": {"mean": None, "std": None, "n": 0}},
        "runs": [1.5],
    }


def test_progress_logs_lines_off_a_terminal(caplog):
    progress = finetune.Progress(4, interval_s=0.0)
    progress.run("pretrained seed 1 fold 2")
    with caplog.at_level(logging.INFO, logger="albert-finetune"):
        progress.step(0.7)
        progress.step(0.6)
    progress.close()
    assert "step 2/4 (50%) pretrained seed 1 fold 2: loss 0.6000" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Readers


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def test_tsv_with_header_pairs_and_string_labels(tmp_path):
    path = write(
        tmp_path / "nli.tsv",
        'id\tpremise\thypothesis\tlabel\n1\tA "quoted" man.\tA man.\tentailment\n\n2\tB\tC\tneutral\n',
    )
    data = read_labelled(path, Columns(text="premise", pair="hypothesis", label="label"))
    assert data.format == "tsv"
    assert data.texts == ['A "quoted" man.', "B"] and data.pairs == ["A man.", "C"]
    assert data.labels == ["entailment", "neutral"] and data.lines == [2, 4]


def test_csv_with_quoted_commas_and_pairs(tmp_path):
    path = write(tmp_path / "pairs.csv", 'label,s1,s2\nyes,"one, two","three ""3"""\nno,"multi\nline",x\n')
    data = read_labelled(path, Columns(text="s1", pair="s2"))
    assert data.format == "csv"
    assert data.texts == ["one, two", "multi\nline"] and data.pairs == ['three "3"', "x"]
    assert data.labels == ["yes", "no"] and data.lines == [2, 3]


def test_json_lines_with_numbers_booleans_and_pairs(tmp_path):
    lines = [
        {"q": "Is it?", "a": "Yes.", "y": 1},
        {"q": "Not?", "a": "No.", "y": 0},
        {"q": "Sure?", "a": "Maybe.", "y": 2.0},
    ]
    path = write(tmp_path / "qa.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    data = read_labelled(path, Columns(text="q", pair="a", label="y"))
    assert (data.format, data.texts, data.pairs, data.labels) == (
        "jsonl",
        ["Is it?", "Not?", "Sure?"],
        ["Yes.", "No.", "Maybe."],
        ["1", "0", "2"],
    )
    flags = write(tmp_path / "flags.jsonl", '{"text": "a", "label": true}\n{"text": "b", "label": false}\n')
    assert read_labelled(flags).labels == ["true", "false"]


def test_fasttext_lines(tmp_path):
    path = write(tmp_path / "reviews.txt", "__label__pos a fine film .\n\n__label__neg  dull ,  dull\t.\n")
    data = read_labelled(path)
    assert data.format == "fasttext"
    assert data.texts == ["a fine film .", "dull , dull ."] and data.labels == ["pos", "neg"] and data.pairs is None


@pytest.mark.parametrize(
    "text, fmt",
    [
        ("__label__a x\n", "fasttext"),
        ('{"text": "x", "label": "a"}\n', "jsonl"),
        ("text\tlabel\nx\ta\n", "tsv"),
        ("text,label\nx,a\n", "csv"),
    ],
)
def test_format_from_content_when_the_name_says_nothing(tmp_path, text, fmt):
    assert read_labelled(write(tmp_path / "data.txt", text)).format == fmt
    assert read_labelled(write(tmp_path / "data", text)).format == fmt


def test_encodings_bom_and_windows_1252(tmp_path, caplog):
    path = write(tmp_path / "bom.csv", "\ufefftext,label\ncafé,a\n", "utf-8")
    assert read_labelled(path).texts == ["café"]  # the BOM does not end up in the first column's name
    old = write(tmp_path / "old.txt", "__label__pos clichés \u2014 fine\n", "cp1252")
    with caplog.at_level(logging.WARNING):
        assert read_labelled(old).texts == ["clichés \u2014 fine"]
    assert "not UTF-8" in caplog.text and str(old) in caplog.text


def test_the_demo_labelled_set():
    """The demo's probe data: Pang & Lee's 200 sentences from the gensim wheel, cached as UTF-8 fastText lines."""
    from data_prep.errors import DataPrepError
    from data_prep.sample_corpora import pang_lee_polarity

    try:
        path = pang_lee_polarity()
    except DataPrepError as exc:  # offline and never cached
        pytest.skip(str(exc))
    data = read_labelled(path)
    assert data.format == "fasttext" and len(data) == 200
    assert data.class_counts() == {"neg": 100, "pos": 100}
    assert any("—" in t for t in data.texts) and all(t.strip() for t in data.texts)


def test_class_order_is_numeric_for_integers():
    assert class_order(["10", "2", "1", "2"]) == ["1", "2", "10"]
    assert class_order(["pos", "neg"]) == ["neg", "pos"]
    assert class_order(["-1", "1"]) == ["-1", "1"]


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the file and the problem


@pytest.mark.parametrize(
    "name, text, columns, expected",
    [
        ("a.tsv", "sentence\tlabel\nx\t1\n", Columns(), "no TSV column 'text' (the file has: sentence, label)"),
        ("a.csv", "text,y\nx,1\n", Columns(), "no CSV column 'label' (the file has: text, y)"),
        ("a.tsv", "text\tlabel\nx\t1\n", Columns(pair="hyp"), "no TSV column 'hyp'"),
        ("a.jsonl", '{"text": "x", "label": 1}\n{"text": "y"}\n', Columns(), "no field (line 2) 'label'"),
        ("a.tsv", "", Columns(), "empty file"),
        ("a.jsonl", "\n  \n", Columns(), "empty file"),
        ("a.csv", "text,label\n\n", Columns(), "no examples (only a header or blank lines)"),
        ("a.tsv", "text\tlabel\nx\t1\textra\n", Columns(), "line 2 has 3 TSV fields, the header has 2"),
        ("a.tsv", "text\tlabel\nx\t \n", Columns(), "line 2 has an empty label"),
        ("a.jsonl", '{"text": "x", "label": 1}\n{"text": \n', Columns(), "line 2 is not valid JSON"),
        ("a.jsonl", '["x", 1]\n', Columns(), "line 1 is not a JSON object"),
        ("a.jsonl", '{"text": "x", "label": [1]}\n', Columns(), "line 1: the label is [1], not a class name"),
        ("a.txt", "__label__a x\nno label here\n", Columns(), "line 2 has no __label__X label at its start"),
        ("a.txt", "__label__a __label__b x\n", Columns(), "multi-label lines are not supported"),
        ("a.txt", "__label__a x\n", Columns(pair="b"), "fastText lines hold one text"),
        ("a.txt", "just words\n", Columns(), "cannot tell the format"),
    ],
)
def test_reader_errors(tmp_path, name, text, columns, expected):
    path = write(tmp_path / name, text)
    with pytest.raises(LabelledDataError) as e:
        read_labelled(path, columns)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message


def config(tmp_path, data, **kw) -> ProbeConfig:
    return ProbeConfig(model=tmp_path / "model", data=data, output=tmp_path / "out", **kw)


def test_task_errors_one_class_label_only_in_dev_and_small_classes(tmp_path):
    one = write(tmp_path / "one.txt", "__label__pos a\n__label__pos b\n")
    with pytest.raises(LabelledDataError, match=f"^{one}: every example has the label 'pos'; a classifier needs two"):
        prepare_task(config(tmp_path, one))
    train = write(tmp_path / "train.txt", "__label__pos a\n__label__neg b\n")
    dev = write(tmp_path / "dev.txt", "__label__pos a\n__label__neutral c\n")
    with pytest.raises(LabelledDataError, match=f"^{dev}: line 2: label 'neutral' does not occur in the training data"):
        prepare_task(config(tmp_path, train, dev=dev))
    with pytest.raises(LabelledDataError, match=f"^{train}: class 'neg' has 1 example.*fewer than --folds 5"):
        prepare_task(config(tmp_path, train))
    with pytest.raises(LabelledDataError, match="--positive-label 'good' is not one of the labels"):
        prepare_task(config(tmp_path, train, dev=train, positive_label="good"))


def test_binary_positive_class_defaults_to_the_last_label(tmp_path):
    path = write(tmp_path / "t.tsv", "text\tlabel\na\t1\nb\t0\nc\t1\nd\t0\n")
    task = prepare_task(config(tmp_path, path, folds=2))
    assert task.classes == ["0", "1"] and task.positive == 1 and task.y.tolist() == [1, 0, 1, 0]
    task = prepare_task(config(tmp_path, path, folds=2, positive_label="0"))
    assert task.positive == 0


def run_main(args, caplog) -> tuple[int, list[str]]:
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="albert-finetune"):
        rc = main([str(a) for a in args])
    return rc, [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_command_errors_exit_2_with_one_line(tmp_path, caplog, hf_folder):
    good = write(tmp_path / "good.txt", "".join(f"__label__{'ab'[i % 2]} w{i}\n" for i in range(10)))
    out = tmp_path / "out"
    no_spm = tmp_path / "no-spm"
    no_spm.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_spm / name).write_bytes((hf_folder / name).read_bytes())
    cases = [
        (["--model", no_spm, "--data", good], f"{no_spm}: no spiece.model, the SentencePiece model of the tokenizer"),
        (["--model", tmp_path / "nowhere", "--data", good], f"{tmp_path / 'nowhere'}: no such folder"),
        (["--model", hf_folder, "--data", tmp_path / "missing.tsv"], f"{tmp_path / 'missing.tsv'}: no such file"),
        (["--model", hf_folder, "--data", write(tmp_path / "e.tsv", "")], f"{tmp_path / 'e.tsv'}: empty file"),
        (
            ["--model", hf_folder, "--data", write(tmp_path / "c.tsv", "sentence\tlabel\nx\ta\n")],
            f"{tmp_path / 'c.tsv'}: no TSV column 'text'",
        ),
        (
            ["--model", hf_folder, "--data", write(tmp_path / "one.txt", "__label__a x\n__label__a y\n")],
            f"{tmp_path / 'one.txt'}: every example has the label 'a'",
        ),
        (
            ["--model", hf_folder, "--data", good, "--dev", write(tmp_path / "dev.txt", "__label__c z\n")],
            f"{tmp_path / 'dev.txt'}: line 1: label 'c' does not occur in the training data {good}",
        ),
        (["--model", hf_folder, "--data", good, "--folds", "1"], "--folds 1: must be at least 2"),
        (
            ["--model", hf_folder, "--data", good, "--max-seq-length", "65"],
            f"{hf_folder}: --max-seq-length 65 exceeds the model's 64 positions",
        ),
    ]
    for args, expected in cases:
        rc, errors = run_main([*args, "--output", out], caplog)
        assert rc == 2, (args, errors)
        assert len(errors) == 1 and errors[0].startswith(expected) and "\n" not in errors[0], errors
    assert not (out / "results.json").exists()


def test_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "example:" in text and "albert-finetune --model" in text
    for flag in ("--text-pair-column", "--dev", "--folds", "--seeds", "--baseline", "--max-seq-length", "--output"):
        assert flag in text


# ---------------------------------------------------------------------------------------------------------------
# End to end on a tiny exported ALBERT

GOOD = ["good", "great", "fine", "lovely", "superb", "excellent"]
BAD = ["bad", "awful", "dull", "poor", "boring", "terrible"]
FILLER = ["the", "film", "was", "a", "story", "and", "very", "plot", "acting", "music", "it", "really", "quite"]


def sentence(rng: random.Random, words: list[str]) -> str:
    body = rng.choices(FILLER, k=rng.randint(3, 8)) + [rng.choice(words)]
    rng.shuffle(body)
    return " ".join(body) + " ."


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest, and alike on every machine, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A tiny random AlbertForPreTraining with a SentencePiece model, exported as albert-export does."""
    folder = tmp_path_factory.mktemp("tiny-albert")
    rng = random.Random(0)
    text = [sentence(rng, GOOD if i % 2 else BAD) for i in range(400)]
    return export_tiny_albert(folder, text, 48)


@pytest.fixture(scope="module")
def sentiment_file(tmp_path_factory) -> Path:
    rng = random.Random(1)
    rows = [(sentence(rng, GOOD if i % 2 else BAD), "positive" if i % 2 else "negative") for i in range(40)]
    path = tmp_path_factory.mktemp("labelled") / "sentiment.tsv"
    path.write_text("id\tsentence\tlabel\n" + "".join(f"{i}\t{s}\t{y}\n" for i, (s, y) in enumerate(rows)))
    return path


def test_pretrained_and_random_init_share_the_head_but_not_the_encoder(hf_folder):
    folder = load_albert_folder(hf_folder, ["a", "b"], 32)
    pretrained, random_init = (new_model(folder, kind, seed=7).state_dict() for kind in ("pretrained", "random-init"))
    assert torch.equal(pretrained["classifier.weight"], random_init["classifier.weight"])
    name = "albert.encoder.albert_layer_groups.0.albert_layers.0.ffn.weight"
    assert torch.equal(pretrained[name], folder.encoder_state[name]) and not torch.equal(
        pretrained[name], random_init[name]
    )


def test_the_training_loop_learns_an_easy_task(hf_folder, sentiment_file):
    cfg = ProbeConfig(model=hf_folder, data=sentiment_file, output=Path("unused"), columns=Columns(text="sentence"))
    task = prepare_task(cfg)
    folder = load_albert_folder(hf_folder, task.classes, 48)
    enc = finetune.encode(folder.tokenizer, task.data, 48)
    everything = np.arange(len(task.y))
    settings = FinetuneSettings(epochs=16, lr=3e-3, batch_size=8, max_seq_length=48)
    pad = folder.tokenizer.pad_token_id
    before = finetune.predict(new_model(folder, "random-init", 1), enc, everything, 16, pad, torch.device("cpu"))
    model = new_model(folder, "random-init", 1)
    progress = finetune.Progress(finetune.steps_per_run(len(everything), settings))
    loss = finetune.train(model, enc, task.y, everything, settings, 1, pad, torch.device("cpu"), progress)
    after = finetune.predict(model, enc, everything, 16, pad, torch.device("cpu"))
    assert progress.done == 16 * 5 and loss < 0.3
    assert classification_scores(task.y, before, 1)["accuracy"] <= 0.6
    assert classification_scores(task.y, after, 1)["accuracy"] >= 0.9


def test_end_to_end_cross_validation(tmp_path, hf_folder, sentiment_file, capsys, monkeypatch):
    seen = []
    predict = finetune.predict
    monkeypatch.setattr(finetune, "predict", lambda m, e, idx, *a: seen.append(tuple(idx)) or predict(m, e, idx, *a))
    args = ["--model", hf_folder, "--data", sentiment_file, "--text-column", "sentence", "--label-column", "label"]
    settings = ["--folds", "4", "--seeds", "2", "--epochs", "3", "--lr", "2e-3", "--batch-size", "8"]
    out = tmp_path / "out"
    assert main([str(a) for a in [*args, *settings, "--max-seq-length", "24", "--output", out]]) == 0
    table = capsys.readouterr().out
    for row in ("pretrained", "random-init", "difference"):
        assert f"\n{row} " in table
    assert "positive class 'positive'" in table

    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and results["classes"] == ["negative", "positive"]
    assert results["settings"]["max_seq_length"] == 24 and results["settings"]["folds"] == 4
    runs = results["runs"]
    assert len(runs) == 2 * 4 * 2
    pre = [(r["seed"], r["fold"]) for r in runs if r["model"] == "pretrained"]
    rnd = [(r["seed"], r["fold"]) for r in runs if r["model"] == "random-init"]
    assert pre == rnd == [(s, k) for s in (42, 43) for k in range(4)]
    # the very same test examples for both models, in every fold and seed
    assert seen[0::2] == seen[1::2] == [tuple(s["test_indices"]) for s in results["splits"]]
    # folds: stratified, disjoint, covering the set once per seed, reshuffled by the seed
    labels = [line.split("\t")[2] for line in sentiment_file.read_text().splitlines()[1:]]
    for seed in (42, 43):
        tests = [s["test_indices"] for s in results["splits"] if s["seed"] == seed]
        assert sorted(i for t in tests for i in t) == list(range(40))
        for t in tests:
            assert Counter(labels[i] for i in t) == {"negative": 5, "positive": 5}
    assert results["splits"][0]["test_indices"] != results["splits"][4]["test_indices"]
    for kind in ("pretrained", "random-init", "difference"):
        assert set(results["summary"][kind]) == {"accuracy", "precision", "recall", "f1", "roc_auc"}
        assert results["summary"][kind]["f1"]["n"] == 8
    for r in runs:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["roc_auc"] <= 1 and r["test_examples"] == 10
    assert results["truncated"]["data"] > 0  # 24 pieces: long sentences were cut, and counted

    # deterministic from --seed
    again = tmp_path / "again"
    assert main([str(a) for a in [*args, *settings, "--max-seq-length", "24", "--output", again]]) == 0
    runs2 = json.loads((again / "results.json").read_text())["runs"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(runs2) == strip(runs)


def test_end_to_end_dev_set_pairs_and_three_classes(tmp_path, hf_folder, capsys):
    rng = random.Random(2)
    names = ["negative", "neutral", "positive"]

    def rows(n):
        for i in range(n):
            y = i % 3
            words = BAD if y == 0 else GOOD if y == 2 else FILLER
            yield {"premise": sentence(rng, FILLER), "hypothesis": sentence(rng, words), "label": names[y]}

    train = write(tmp_path / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows(30)))
    dev = write(tmp_path / "dev.jsonl", "".join(json.dumps(r) + "\n" for r in rows(12)))
    args = ["--model", hf_folder, "--data", train, "--dev", dev, "--text-column", "premise"]
    args += ["--text-pair-column", "hypothesis", "--seeds", "2", "--epochs", "1", "--baseline", "none"]
    assert main([str(a) for a in [*args, "--output", tmp_path / "out"]]) == 0
    table = capsys.readouterr().out
    assert "\npretrained " in table and "random-init" not in table and "macro averages" in table
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["classes"] == names and results["positive_label"] is None
    assert [(r["model"], r["seed"], r["fold"], r["test_examples"]) for r in results["runs"]] == [
        ("pretrained", 42, None, 12),
        ("pretrained", 43, None, 12),
    ]
    assert "difference" not in results["summary"]


def test_splits_ignore_the_model(tmp_path):
    """make_splits depends on the labels and seeds only: one list serves every model."""
    path = write(tmp_path / "t.txt", "".join(f"__label__{'xyz'[i % 3]} w{i}\n" for i in range(27)))
    cfg = config(tmp_path, path, folds=3, seeds=2, train=FinetuneSettings(epochs=1))
    task = prepare_task(cfg)
    first, second = make_splits(task, cfg), make_splits(task, cfg)
    assert [(s.seed, s.fold, s.test.tolist()) for s in first] == [(s.seed, s.fold, s.test.tolist()) for s in second]
    for s in first:
        assert Counter(task.y[s.test].tolist()) == {0: 3, 1: 3, 2: 3}
