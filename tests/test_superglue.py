import json
import os
import random
import re
import stat
import subprocess
import sys
import zipfile

import pytest

import data
import superglue
import train
from conftest import REAL_SUPERGLUE, answer_part


def span(text, entity, occurrence=0):
    """ReCoRD-style span of the n-th occurrence of `entity`, with an INCLUSIVE end."""
    start = -1
    for _ in range(occurrence + 1):
        start = text.index(entity, start + 1)
    return {"start": start, "end": start + len(entity) - 1}


RECORD_TEXT = ("Tracy Morgan will host SNL. Tracy Morgan is back.\n@highlight\nMorgan returns to NBC\n"
               "@highlight\nSNL airs in October")
RECORD_ENTITIES = [span(RECORD_TEXT, "Tracy Morgan"), span(RECORD_TEXT, "SNL"), span(RECORD_TEXT, "Tracy Morgan", 1),
                   span(RECORD_TEXT, "Morgan", 2), span(RECORD_TEXT, "NBC"), span(RECORD_TEXT, "SNL", 1)]
RECORD_SHOWN = "Tracy Morgan will host SNL. Tracy Morgan is back.\n- Morgan returns to NBC\n- SNL airs in October"
QUESTION = "\nQuestion: What is the \"@placeholder\"?\nAnswer: "
CB_CANDIDATES = ["Yes", "No", "Maybe"]

# Official-schema records per task (keys deliberately in varied order) and, per example, the literal
# expected (prompt, candidates, gold).
FIXTURES = {
    "boolq": (
        [{"question": "is the sky blue", "passage": "Sky -- The sky is blue on a clear day.", "idx": 0, "label": True},
         {"label": False, "idx": 1, "passage": "Grass -- Grass is green.", "question": "is grass red"}],
        [("Sky -- The sky is blue on a clear day. is the sky blue\nAnswer: ", ["No", "Yes"], 1),
         ("Grass -- Grass is green. is grass red\nAnswer: ", ["No", "Yes"], 0)]),
    "cb": (
        [{"premise": "It rained. The ground was wet.", "hypothesis": "the ground was wet", "label": "entailment",
          "idx": 0},
         {"idx": 1, "label": "contradiction", "hypothesis": "it was dry", "premise": "It rained."},
         {"premise": "It rained.", "hypothesis": "it was cold", "label": "neutral", "idx": 2}],
        [("Suppose It rained. The ground was wet. Can we infer that \"the ground was wet\"? Yes, No, or Maybe?\n"
          "Answer: ", CB_CANDIDATES, 0),
         ("Suppose It rained. Can we infer that \"it was dry\"? Yes, No, or Maybe?\nAnswer: ", CB_CANDIDATES, 1),
         ("Suppose It rained. Can we infer that \"it was cold\"? Yes, No, or Maybe?\nAnswer: ", CB_CANDIDATES, 2)]),
    "copa": (
        [{"premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.",
          "choice2": "The grass was cut.", "question": "cause", "label": 0, "idx": 0},
         {"idx": 1, "label": 1, "question": "effect", "choice2": "Water flowed from the spout.",
          "choice1": "The toilet filled with water.", "premise": "The man turned on the faucet."}],
        [("My body cast a shadow over the grass. because ", ["The sun was rising.", "The grass was cut."], 0),
         ("The man turned on the faucet. so ", ["The toilet filled with water.", "Water flowed from the spout."], 1)]),
    "multirc": (
        [{"idx": 0, "version": 1.1, "passage": {"text": "Carl is a robot. He needs a tire.", "questions": [
            {"question": "What is Carl?", "idx": 0, "answers": [
                {"text": "A robot", "idx": 0, "label": 1}, {"text": "A tire", "idx": 1, "label": 0}]},
            {"idx": 1, "answers": [{"label": 1, "idx": 2, "text": "A tire"}], "question": "What does Carl need?"}]}},
         {"passage": {"questions": [{"question": "Is Carl sad?", "answers": [{"text": "No", "idx": 3, "label": 0}],
                                     "idx": 2}], "text": "Carl smiles."}, "idx": 1}],
        [("Carl is a robot. He needs a tire.\nQuestion: What is Carl?\nI found this answer \"A robot\". "
          "Is that correct? Yes or No?\nAnswer: ", ["No", "Yes"], 1),
         ("Carl is a robot. He needs a tire.\nQuestion: What is Carl?\nI found this answer \"A tire\". "
          "Is that correct? Yes or No?\nAnswer: ", ["No", "Yes"], 0),
         ("Carl is a robot. He needs a tire.\nQuestion: What does Carl need?\nI found this answer \"A tire\". "
          "Is that correct? Yes or No?\nAnswer: ", ["No", "Yes"], 1),
         ("Carl smiles.\nQuestion: Is Carl sad?\nI found this answer \"No\". Is that correct? Yes or No?\nAnswer: ",
          ["No", "Yes"], 0)]),
    "record": (
        [{"source": "Daily mail", "passage": {"text": RECORD_TEXT, "entities": RECORD_ENTITIES},
          "qas": [{"query": "@placeholder will host the show.", "idx": 0,
                   "answers": [dict(span(RECORD_TEXT, "Tracy Morgan"), text="Tracy Morgan"),
                               dict(span(RECORD_TEXT, "Morgan", 2), text="Morgan"),
                               dict(span(RECORD_TEXT, "Tracy Morgan", 1), text="Tracy Morgan")]},
                  {"idx": 1, "answers": [dict(span(RECORD_TEXT, "NBC"), text="NBC")],
                   "query": "The show is on @placeholder."}], "idx": 0}],
        [(RECORD_SHOWN + "\n@placeholder will host the show." + QUESTION, ["Morgan", "NBC", "SNL"], 0),
         (RECORD_SHOWN + "\nThe show is on @placeholder." + QUESTION, ["Morgan", "NBC", "SNL", "Tracy Morgan"], 1)]),
    "rte": (
        [{"premise": "Dana Reeve died of lung cancer.", "hypothesis": "Dana Reeve is dead.", "label": "entailment",
          "idx": 0},
         {"idx": 1, "label": "not_entailment", "hypothesis": "Dana Reeve had an accident.",
          "premise": "Dana Reeve died."}],
        [("Dana Reeve died of lung cancer.\nDoes this mean that \"Dana Reeve is dead.\" is true? Yes or No?\nAnswer: ",
          ["Yes", "No"], 0),
         ("Dana Reeve died.\nDoes this mean that \"Dana Reeve had an accident.\" is true? Yes or No?\nAnswer: ",
          ["Yes", "No"], 1)]),
    "wic": (
        [{"word": "place", "sentence1": "Come over to my place.", "sentence2": "A system with no place for us.",
          "idx": 0, "label": False, "start1": 16, "start2": 17, "end1": 21, "end2": 22, "version": 1.1}],
        [("Does the word \"place\" have the same meaning in these two sentences? Yes, No?\nCome over to my place.\n"
          "A system with no place for us.\nAnswer: ", ["No", "Yes"], 0)]),
    "wsc": (
        [{"text": "Mark told Pete lies about himself. He should have been more skeptical.",
          "target": {"span2_index": 6, "span1_index": 0, "span1_text": "Mark", "span2_text": "He"}, "idx": 0,
          "label": False},
         {"label": True, "idx": 1, "text": "The cup fell off the table because it was at the edge.",
          "target": {"span1_text": "The cup", "span2_text": "it", "span1_index": 0, "span2_index": 7}}],
        [("Mark told Pete lies about himself. He should have been more skeptical.\nIn the previous sentence, does the "
          "pronoun \"He\" refer to \"Mark\"? Yes or No?\nAnswer: ", ["No", "Yes"], 0),
         ("The cup fell off the table because it was at the edge.\nIn the previous sentence, does the pronoun \"it\" "
          "refer to \"The cup\"? Yes or No?\nAnswer: ", ["No", "Yes"], 1)]),
}


def unlabelled(obj, drop):
    """A test-split copy: the `drop` keys removed everywhere, the other keys in reverse order."""
    if isinstance(obj, list):
        return [unlabelled(x, drop) for x in obj]
    if isinstance(obj, dict):
        return {k: unlabelled(obj[k], drop) for k in reversed(list(obj)) if k != drop}
    return obj


def write_jsonl(path, records, final_newline=True):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in records) + "\n" * final_newline)


def load_lines(folder, task, lines):
    """superglue.load_task(task, folder, "train") of a train.jsonl holding `lines` (text or bytes)."""
    path = folder / superglue.TASK_DIRS[task] / "train.jsonl"
    os.makedirs(path.parent, exist_ok=True)
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return superglue.load_task(task, str(folder), "train")


@pytest.fixture(scope="module")
def sg_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("superglue")
    for task, (records, _) in FIXTURES.items():
        for split in ("train", "val"):
            write_jsonl(os.path.join(root, superglue.TASK_DIRS[task], f"{split}.jsonl"), records)
        test_records = unlabelled(records, "answers" if task == "record" else "label")
        write_jsonl(os.path.join(root, superglue.TASK_DIRS[task], "test.jsonl"), test_records, final_newline=False)
    return str(root)


# ------------------------------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("task", superglue.TASKS)
def test_parser_templates_and_golds(sg_dir, task):
    examples = superglue.load_task(task.upper(), sg_dir, "train")  # task names are case-insensitive
    expected = FIXTURES[task][1]
    assert [(ex.prompt, ex.candidates, ex.gold) for ex in examples] == expected
    assert all(ex.task == task for ex in examples)


@pytest.mark.parametrize("task", superglue.TASKS)
def test_test_split_loads_without_labels(sg_dir, task):
    test, train = superglue.load_task(task, sg_dir, "test"), superglue.load_task(task, sg_dir, "train")
    assert [ex.gold for ex in test] == [None] * len(train)
    assert [(ex.prompt, ex.idx) for ex in test] == [(ex.prompt, ex.idx) for ex in train]
    if task == "record":  # without golds, every distinct entity is a candidate, sorted
        assert test[0].candidates == ["Morgan", "NBC", "SNL", "Tracy Morgan"]


def test_multirc_ids_and_groups(sg_dir):
    examples = superglue.load_task("multirc", sg_dir, "val")
    assert [ex.idx for ex in examples] == [{"paragraph": 0, "question": 0, "answer": 0},
                                           {"paragraph": 0, "question": 0, "answer": 1},
                                           {"paragraph": 0, "question": 1, "answer": 2},
                                           {"paragraph": 1, "question": 2, "answer": 3}]
    assert [ex.group for ex in examples] == [(0, 0), (0, 0), (0, 1), (1, 2)]


def test_record_keeps_every_gold_answer(sg_dir):
    first, second = superglue.load_task("record", sg_dir, "val")
    assert first.answers == ["Morgan", "Tracy Morgan"] and second.answers == ["NBC"]
    assert first.idx == {"passage": 0, "query": 0} and second.group == 1


def test_bad_input_errors(sg_dir, tmp_path):
    with pytest.raises(ValueError, match="boolq, cb, copa, multirc, record, rte, wic, wsc"):
        superglue.load_task("squad", sg_dir, "train")
    with pytest.raises(ValueError, match="train, val, test"):
        superglue.load_task("boolq", sg_dir, "validation")
    with pytest.raises(FileNotFoundError, match=re.escape(os.path.join(str(tmp_path), "nope", "BoolQ", "train.jsonl"))):
        superglue.load_task("boolq", str(tmp_path / "nope"), "train")

    good = json.dumps(FIXTURES["boolq"][0][0])
    with pytest.raises(ValueError, match=r"BoolQ.train\.jsonl, line 2: malformed JSON"):
        load_lines(tmp_path, "boolq", [good, '{"question": "x", '])
    with pytest.raises(ValueError, match=r"train\.jsonl, line 1: missing field 'question'"):
        load_lines(tmp_path, "boolq", [json.dumps({"passage": "p", "idx": 0, "label": True})])
    with pytest.raises(ValueError, match=r"line 1: missing field 'label'"):  # train/val must be labelled
        load_lines(tmp_path, "boolq", [json.dumps({"passage": "p", "question": "q", "idx": 0})])
    record = json.loads(json.dumps(FIXTURES["multirc"][0][0]))
    del record["passage"]["questions"][1]["answers"][0]["text"]
    with pytest.raises(ValueError, match=r"line 1, passage.questions\[1\].answers\[0\]: missing field 'text'"):
        load_lines(tmp_path, "multirc", [json.dumps(record)])
    with pytest.raises(ValueError, match=r"label 'maybe' out of range"):
        load_lines(tmp_path, "cb", [json.dumps(dict(FIXTURES["cb"][0][0], label="maybe"))])
    with pytest.raises(ValueError, match=r"label 2 out of range"):
        load_lines(tmp_path, "copa", [json.dumps(dict(FIXTURES["copa"][0][0], label=2))])
    record = json.loads(json.dumps(FIXTURES["record"][0][0]))
    record["passage"]["entities"][0]["end"] = 10_000
    with pytest.raises(ValueError, match=r"entities\[0\]: span \[0, 10000\]"):
        load_lines(tmp_path, "record", [json.dumps(record)])


def test_bad_data_is_named_by_file_and_line(tmp_path):
    """Invalid UTF-8, null or non-string text, a duplicate idx, a lone surrogate: one clear line naming the file,
    the line and the field, before any tokenizer sees the text."""
    good = FIXTURES["boolq"][0][0]
    where = re.escape(os.path.join(str(tmp_path), "BoolQ", "train.jsonl")) + ", line 2: "
    with pytest.raises(ValueError, match=where + r"not valid UTF-8 \(byte 0xe9 at column 18\)"):
        load_lines(tmp_path, "boolq",
                   [json.dumps(good), b'{"question": "caf\xe9", "passage": "p", "idx": 1, "label": true}'])
    with pytest.raises(ValueError, match=where + "field 'question' is null; it must be text"):
        load_lines(tmp_path, "boolq", [json.dumps(good), json.dumps(dict(good, idx=1, question=None))])
    with pytest.raises(ValueError, match=where + "field 'passage' is 3; it must be text"):
        load_lines(tmp_path, "boolq", [json.dumps(good), json.dumps(dict(good, idx=1, passage=3))])
    with pytest.raises(ValueError, match=where + r"duplicate idx 0 \(first on line 1\)"):
        load_lines(tmp_path, "boolq", [json.dumps(good), json.dumps(good)])
    with pytest.raises(ValueError, match=where + r"field 'question' holds a lone surrogate '\\ud83d' at character 4"):
        load_lines(tmp_path, "boolq",
                   [json.dumps(good), json.dumps(dict(good, idx=1)).replace('"is the', '"is \\ud83d the')])
    record = json.loads(json.dumps(FIXTURES["multirc"][0][0]))
    record["passage"]["questions"][1]["answers"][0]["text"] = 7
    with pytest.raises(ValueError, match=r"line 1, passage.questions\[1\].answers\[0\]: field 'text' is 7"):
        load_lines(tmp_path, "multirc", [json.dumps(record)])
    second = json.loads(json.dumps(FIXTURES["multirc"][0][0]))
    second["passage"]["questions"] = second["passage"]["questions"][:1]  # the same paragraph, question, answer ids
    with pytest.raises(ValueError, match=r"line 2: duplicate idx \{'paragraph': 0, 'question': 0, 'answer': 0\}"):
        load_lines(tmp_path, "multirc", [json.dumps(FIXTURES["multirc"][0][0]), json.dumps(second)])
    record = json.loads(json.dumps(FIXTURES["record"][0][0]))
    record["qas"][1]["idx"] = 0
    with pytest.raises(ValueError, match=r"line 1: duplicate idx \{'passage': 0, 'query': 0\}"):
        load_lines(tmp_path, "record", [json.dumps(record)])
    record["qas"][1].update(idx=1, query=None)
    with pytest.raises(ValueError, match=r"line 1, qas\[1\]: field 'query' is null"):
        load_lines(tmp_path, "record", [json.dumps(record)])
    bom = load_lines(tmp_path, "boolq", [b"\xef\xbb\xbf" + json.dumps(good).encode()])
    assert [ex.idx for ex in bom] == [0]  # a BOM is fine


# ------------------------------------------------------------------------------------------------ encoding

def test_encode_masks_everything_but_answer_and_eos(sg_dir, tok):
    for task in superglue.TASKS:
        for ex in superglue.load_task(task, sg_dir, "train"):
            ids, labels = data.encode_train(tok, ex, 256)
            assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and len(ids) == len(labels)
            first = next(i for i, lab in enumerate(labels) if lab != data.IGNORE_INDEX)
            assert labels[first:] == ids[first:] and all(lab == data.IGNORE_INDEX for lab in labels[:first])
            assert answer_part(tok, ids, labels) == ex.candidates[ex.gold]
            assert tok.decode(ids[1:-1]) == ex.prompt + ex.candidates[ex.gold]
            candidates = data.encode_candidates(tok, ex, 256)
            assert [answer_part(tok, i, lab) for i, lab in candidates] == ex.candidates


def test_unlabelled_example_cannot_be_trained(sg_dir, tok):
    with pytest.raises(ValueError, match="no label"):
        data.encode_train(tok, superglue.load_task("rte", sg_dir, "test")[0], 256)


# ------------------------------------------------------------------------------------------------- metrics

def make(task, gold, candidates=("No", "Yes"), group=None, answers=()):
    return data.Example(task, 0, "", "", "", list(candidates), gold, group=group, answers=list(answers))


def test_accuracy_and_cb_macro_f1():
    golds, preds = [0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2]
    metrics = superglue.compute_metrics("CB", [make("cb", g, ["Yes", "No", "Maybe"]) for g in golds], preds)
    # per class F1 = 2TP / (2TP + FP + FN): class 0: 2/4, class 1: 2/3, class 2: 4/5
    assert metrics == pytest.approx({"accuracy": 4 / 6, "f1": (1 / 2 + 2 / 3 + 4 / 5) / 3})


def test_cb_macro_f1_averages_all_three_classes():
    """jiant's CommitmentBankEvaluationScheme: the mean of the F1 of classes 0, 1 and 2, an absent class counting 0
    (not the mean over the classes present, as scikit-learn's average='macro'), e.g. in a small --eval-samples."""
    golds, preds = [0, 0, 1, 1], [0, 1, 1, 1]  # no 'neutral' (2) in either
    metrics = superglue.compute_metrics("cb", [make("cb", g, ["Yes", "No", "Maybe"]) for g in golds], preds)
    assert metrics["f1"] == pytest.approx((2 / 3 + 4 / 5 + 0) / 3)  # class 0: 2TP/(2TP+FP+FN) = 2/3, class 1: 4/5


def test_multirc_f1a_and_exact_match():
    golds, groups = [1, 0, 1, 0, 1], ["q1", "q1", "q1", "q2", "q2"]
    preds = [1, 0, 1, 1, 1]  # q1 all right, q2 one wrong; TP=3, FP=1, FN=0
    metrics = superglue.compute_metrics("multirc", [make("multirc", g, group=q) for g, q in zip(golds, groups)], preds)
    assert metrics == pytest.approx({"accuracy": 4 / 5, "f1a": 6 / 7, "em": 1 / 2})


def test_record_f1_and_em_take_max_over_golds():
    examples = [make("record", 0, ["Tracy Morgan", "NBC", "the Morgan family"], answers=["Tracy Morgan", "Morgan"]),
                make("record", 1, ["SNL", "The NBC!"], answers=["NBC"])]
    # "morgan family" vs "morgan": P=1/2, R=1 -> F1 2/3 (vs "tracy morgan": 1/2); "nbc" == "nbc" after normalising
    metrics = superglue.compute_metrics("record", examples, [2, 1])
    assert metrics == pytest.approx({"accuracy": 1 / 2, "f1": (2 / 3 + 1) / 2, "em": 1 / 2})


def test_metrics_refuse_unlabelled(sg_dir):
    with pytest.raises(ValueError, match="no label"):
        superglue.compute_metrics("rte", superglue.load_task("rte", sg_dir, "test"), [0, 0])


def test_write_predictions_submission_format(sg_dir, tmp_path):
    def written(task, preds):
        path = superglue.write_predictions(task, superglue.load_task(task, sg_dir, "test"), preds, str(tmp_path))
        assert os.path.basename(path) == superglue.TASK_DIRS[task] + ".jsonl"
        return [json.loads(line) for line in open(path)]

    assert written("boolq", [1, 0]) == [{"idx": 0, "label": "true"}, {"idx": 1, "label": "false"}]
    assert written("cb", [2, 0, 1]) == [{"idx": 0, "label": "neutral"}, {"idx": 1, "label": "entailment"},
                                        {"idx": 2, "label": "contradiction"}]
    assert written("copa", [1, 0]) == [{"idx": 0, "label": 1}, {"idx": 1, "label": 0}]
    assert written("rte", [1, 0]) == [{"idx": 0, "label": "not_entailment"}, {"idx": 1, "label": "entailment"}]
    assert written("wic", [1]) == [{"idx": 0, "label": "true"}]
    assert written("wsc", [0, 1]) == [{"idx": 0, "label": "False"}, {"idx": 1, "label": "True"}]
    assert written("record", [1, 3]) == [{"idx": 0, "label": "NBC"}, {"idx": 1, "label": "Tracy Morgan"}]
    assert written("multirc", [1, 0, 1, 1]) == [
        {"idx": 0, "passage": {"questions": [{"idx": 0, "answers": [{"idx": 0, "label": 1}, {"idx": 1, "label": 0}]},
                                             {"idx": 1, "answers": [{"idx": 2, "label": 1}]}]}},
        {"idx": 1, "passage": {"questions": [{"idx": 2, "answers": [{"idx": 3, "label": 1}]}]}}]
    assert sorted(os.listdir(tmp_path)) == sorted(f"{superglue.TASK_DIRS[t]}.jsonl" for t in superglue.TASKS)  # no tmp


# ------------------------------------------------------------------------------------------- the leaderboard

AX_B = [{"idx": str(i), "label": "entailment", "sentence1": f"The cat sat on mat {i}.", "sentence2": "A cat sat.",
         "logic": "Negation"} for i in range(3)]
AX_G = [{"hypothesis": "The nurse was tired.", "idx": i, "label": "not_entailment", "pair_id": 551646 + i,
         "premise": f"The nurse worked {i} shifts."} for i in range(4)]


def test_rte_predicts_the_diagnostics(tmp_path, tok_path, capsys):
    """train.py --task rte --predict writes RTE.jsonl and, from the same model, AX-b.jsonl and AX-g.jsonl, in the
    jiant formatter's schema (AX-b's string idx written as a number)."""
    rte = FIXTURES["rte"][0]
    for split in ("train", "val"):
        write_jsonl(os.path.join(tmp_path, "RTE", f"{split}.jsonl"), rte)
    write_jsonl(os.path.join(tmp_path, "RTE", "test.jsonl"), unlabelled(rte, "label"))
    write_jsonl(os.path.join(tmp_path, "AX-b", "AX-b.jsonl"), AX_B)
    write_jsonl(os.path.join(tmp_path, "AX-g", "AX-g.jsonl"), AX_G, final_newline=False)
    out = tmp_path / "out"
    train.main(["--task", "rte", "--data-dir", str(tmp_path), "--tokenizer", tok_path, "--epochs", "0",
                "--max-len", "128", "--predict", "--save-dir", str(out)])
    for name, ids in (("RTE", [0, 1]), ("AX-b", [0, 1, 2]), ("AX-g", [0, 1, 2, 3])):
        rows = [json.loads(line) for line in open(out / f"{name}.jsonl")]
        assert [row["idx"] for row in rows] == ids
        assert all(row["label"] in ("entailment", "not_entailment") and len(row) == 2 for row in rows)
    os.remove(tmp_path / "AX-g" / "AX-g.jsonl")
    train.main(["--task", "rte", "--data-dir", str(tmp_path), "--tokenizer", tok_path, "--epochs", "0",
                "--max-len", "128", "--predict", "--save-dir", str(tmp_path / "out2")])
    assert "a full leaderboard submission needs" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "out2")) == ["AX-b.jsonl", "RTE.jsonl", "metrics.jsonl"]


def test_real_diagnostics_take_the_rte_prompt(real_superglue):
    diagnostics = superglue.load_diagnostics(real_superglue)
    for name, (premise, hypothesis) in (("axb", ("sentence1", "sentence2")), ("axg", ("premise", "hypothesis"))):
        raw = raw_records(name, None)
        template = "{}\nDoes this mean that \"{}\" is true? Yes or No?\nAnswer: "
        assert [(ex.prompt, ex.candidates, ex.gold) for ex in diagnostics[name]] == [
            (template.format(r[premise], r[hypothesis]), ["Yes", "No"], None) for r in raw]
        assert [ex.idx for ex in diagnostics[name]] == [r["idx"] for r in raw]
    assert diagnostics["axb"][0].idx == "0" and diagnostics["axg"][0].idx == 0  # as the release writes them


def test_pack_submission_needs_all_ten_files(tmp_path):
    folder = tmp_path / "preds"
    for name in superglue.TASK_DIRS.values():
        if name != "AX-g":
            write_jsonl(os.path.join(folder, f"{name}.jsonl"), [{"idx": 0, "label": "true"}])
    with pytest.raises(FileNotFoundError, match=r"preds lacks AX-g.jsonl: a SuperGLUE submission needs all ten"):
        superglue.pack_submission(str(folder), str(tmp_path / "s.zip"))
    write_jsonl(os.path.join(folder, "AX-g.jsonl"), [{"label": "entailment"}])
    with pytest.raises(ValueError, match=r"AX-g.jsonl, line 1: not a prediction"):
        superglue.pack_submission(str(folder), str(tmp_path / "s.zip"))
    write_jsonl(os.path.join(folder, "AX-g.jsonl"), [{"idx": 0, "label": "entailment"}])
    result = subprocess.run([sys.executable, "superglue.py", str(folder)], cwd=os.path.dirname(superglue.__file__),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(tmp_path / "preds.zip") as archive:
        assert sorted(archive.namelist()) == sorted(["BoolQ.jsonl", "CB.jsonl", "COPA.jsonl", "MultiRC.jsonl",
                                                     "ReCoRD.jsonl", "RTE.jsonl", "WiC.jsonl", "WSC.jsonl",
                                                     "AX-b.jsonl", "AX-g.jsonl"])
        assert archive.read("AX-g.jsonl") == (folder / "AX-g.jsonl").read_bytes()
    with pytest.raises(FileExistsError, match="preds.zip exists"):  # never overwritten
        superglue.pack_submission(str(folder), str(tmp_path / "preds.zip"))
    assert sorted(os.listdir(tmp_path)) == ["preds", "preds.zip"]


def test_written_files_get_the_permissions_of_a_plain_open(tmp_path):
    """The temporary file behind an atomic write is made 0600; the result must not keep that mode."""
    umask = os.umask(0o022)
    try:
        plain = tmp_path / "plain"
        plain.write_text("x")
        path = superglue.write_predictions("cb", [data.Example("cb", 0, "", "", "p", ["a", "b", "c"], 0)], [1], str(tmp_path))
        assert stat.S_IMODE(os.stat(path).st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o644
    finally:
        os.umask(umask)


# ------------------------------------------------------------------------------------------------ sampling

def hf_rows(task, records):
    """The rows of Hugging Face's super_glue loader, which the paper's code samples from, written independently of
    superglue.py: MultiRC yields one row per answer; ReCoRD one per query, its entities sorted and de-duplicated,
    its answers too; and the paper's process_record() drops the golds after the first from the choices."""
    if task == "multirc":
        return [{"idx": {"paragraph": r["idx"], "question": q["idx"], "answer": a["idx"]}}
                for r in records for q in r["passage"]["questions"] for a in q["answers"]]
    if task != "record":
        return [{"idx": r["idx"]} for r in records]
    rows = []
    for r in records:
        text = r["passage"]["text"]
        entities = sorted({text[e["start"]:e["end"] + 1] for e in r["passage"]["entities"]})
        for q in r["qas"]:
            answers = sorted({a["text"] for a in q["answers"]})
            choices = [e for e in entities if e not in answers[1:]]
            rows.append({"idx": {"passage": r["idx"], "query": q["idx"]}, "choices": choices,
                         "answer_idx": choices.index(answers[0])})
    return rows


def paper_sample(rows, n):
    """OpenLMLab/LOMO src/mydatasets.py: REPRODUCIBILITY_SEED = 0, whatever the training seed."""
    if len(rows) <= n:
        return rows
    random.seed(0)
    return [rows[i] for i in random.sample(list(range(len(rows))), n)]


def sampling_fixture(task):
    """Official-schema records with more rows than are sampled: BoolQ 23 rows; MultiRC 4 passages x 3 questions x
    1-4 answers; ReCoRD 3 passages x 4 queries, entities repeated and out of order, some queries with two golds."""
    rng = random.Random(1)
    if task == "boolq":
        return [{"idx": i, "question": f"q{i}", "passage": f"p{i}", "label": i % 3 == 0} for i in range(23)]
    if task == "multirc":
        records, n_q, n_a = [], 0, 0
        for p in range(4):
            questions = []
            for _ in range(3):
                answers = [{"idx": n_a + k, "text": f"answer {n_a + k}", "label": rng.randint(0, 1)}
                           for k in range(rng.randint(1, 4))]
                questions.append({"idx": n_q, "question": f"question {n_q}", "answers": answers})
                n_q, n_a = n_q + 1, n_a + len(answers)
            records.append({"idx": p, "passage": {"text": f"Passage {p}.", "questions": questions}})
        return records
    records = []
    for p in range(3):
        names = rng.sample(["Zoe", "Bob", "3-D", "CNN", "Paris", "NASA", "Tracy Morgan", "Ann", "BBC"], 6)
        text = ", ".join(names) + f" met. @highlight\n{names[0]} left"
        entities = [span(text, name) for name in names] + [span(text, names[0], 1)]
        qas = [{"idx": 4 * p + k, "query": f"@placeholder did {k}.",
                "answers": [dict(span(text, g), text=g) for g in [names[k + 1]] + [names[k]] * (k % 2)]}
               for k in range(4)]
        records.append({"idx": p, "passage": {"text": text, "entities": entities}, "qas": qas})
    return records


@pytest.mark.parametrize("task", ["boolq", "multirc", "record"])
def test_default_subsets_are_the_papers(tmp_path, task):
    """train.py's default sampling picks the rows that the paper's code picks, in its order, for any --seed."""
    records = sampling_fixture(task)
    for split in ("train", "val"):
        write_jsonl(os.path.join(tmp_path, superglue.TASK_DIRS[task], f"{split}.jsonl"), records)
    for seed in ("42", "7"):
        args = train.parse_args(["--task", task, "--data-dir", str(tmp_path), "--seed", seed])
        for split in ("train", "val"):
            got, want = train.load_examples(args, split, 5), paper_sample(hf_rows(task, records), 5)
            assert [ex.idx for ex in got] == [row["idx"] for row in want]
            if task == "record":
                assert [(ex.candidates, ex.gold) for ex in got] == [(r["choices"], r["answer_idx"]) for r in want]
    if task == "multirc":  # --sampling groups: whole questions, a subset that changes with --seed
        every = superglue.load_task(task, str(tmp_path), "train")
        draws = [train.load_examples(train.parse_args(["--task", task, "--data-dir", str(tmp_path), "--seed", seed,
                                                       "--sampling", "groups"]), "train", 5) for seed in ("1", "2")]
        for draw in draws:
            questions = {ex.group for ex in draw}
            assert len(draw) >= 5 and [ex.idx for ex in draw] == [ex.idx for ex in every if ex.group in questions]
        assert draws[0] != draws[1]


def test_group_subsets_take_whole_groups():
    examples = [make("multirc", i % 2, group=i // 3) for i in range(30)]  # 10 questions of 3 answers
    sample = data.group_subset(examples, 7, seed=0)
    groups = [ex.group for ex in sample]
    assert len(sample) == 9 and all(groups.count(g) == 3 for g in groups)
    assert [ex.group for ex in data.group_subset(examples, 7, seed=0)] == groups
    others = {tuple(ex.group for ex in data.group_subset(examples, 7, seed=s)) for s in range(5)}
    assert others != {tuple(groups)}
    assert data.group_subset(examples, 30, seed=0) == examples


# ----------------------------------------------------------------------------------------------- real data

def raw_records(task, split):
    name = superglue.TASK_DIRS[task]
    with open(os.path.join(REAL_SUPERGLUE, name, f"{split or name}.jsonl")) as f:
        return [json.loads(line) for line in f]


EXPECTED_GOLD = {  # raw record -> gold candidate index, written independently of data.py
    "boolq": lambda r: ["No", "Yes"].index("Yes" if r["label"] else "No"),
    "cb": lambda r: ["Yes", "No", "Maybe"].index({"entailment": "Yes", "contradiction": "No",
                                                  "neutral": "Maybe"}[r["label"]]),
    "copa": lambda r: r["label"],
    "rte": lambda r: ["Yes", "No"].index("Yes" if r["label"] == "entailment" else "No"),
    "wic": lambda r: int(r["label"]),
    "wsc": lambda r: int(r["label"]),
}


@pytest.mark.parametrize("split", ["train", "val"])
def test_real_superglue_files(real_tok, real_superglue, split):
    for task in superglue.TASKS:
        examples, raw = superglue.load_task(task, real_superglue, split), raw_records(task, split)
        if task in EXPECTED_GOLD:
            assert [ex.gold for ex in examples] == [EXPECTED_GOLD[task](r) for r in raw]
            assert [ex.idx for ex in examples] == [r["idx"] for r in raw]
        elif task == "multirc":
            answers = [a for r in raw for q in r["passage"]["questions"] for a in q["answers"]]
            assert [ex.gold for ex in examples] == [a["label"] for a in answers]
        else:  # record: one example per query, candidates and gold as the paper's code has them
            rows = hf_rows("record", raw)
            assert [(ex.idx, ex.candidates, ex.gold) for ex in examples] == \
                [(row["idx"], row["choices"], row["answer_idx"]) for row in rows]
            assert all("@highlight" not in ex.prompt for ex in examples)
        for ex in examples[:4]:
            assert ex.prompt.endswith("Answer: ") or task == "copa"
            for (ids, labels), answer in zip(data.encode_candidates(real_tok, ex, 256), ex.candidates):
                assert len(ids) <= 256 and answer_part(real_tok, ids, labels) == answer
    if split == "val":  # "Morgan" and "Tracy Morgan" are both gold: "Morgan" sorts first and stays a candidate
        tracy = superglue.load_task("record", real_superglue, "val")[0]
        assert tracy.answers == ["Morgan", "Tracy Morgan"] and tracy.candidates[tracy.gold] == "Morgan"
        assert "Tracy Morgan" not in tracy.candidates


def test_real_files_are_encoded_as_the_official_code_does(real_tok, real_superglue):
    """Every candidate of every real example, passage uncut: the label mask of OpenLMLab/LOMO's _tokenize_fn,
    labels[:len(tokenizer.encode(source)) - 1], which scores ReCoRD's lone '▁' before "3-D" and the like."""
    lone = 0
    for task in superglue.TASKS:
        for split in ("train", "val"):
            for ex in superglue.load_task(task, real_superglue, split)[:100]:  # MultiRC has 7,303
                n = len(real_tok.encode(ex.prompt, bos=True, eos=False)) - 1
                for (ids, labels), answer in zip(data.encode_candidates(real_tok, ex, 4096), ex.candidates):
                    assert ids == real_tok.encode(ex.prompt + answer, bos=True, eos=True)
                    assert labels == [data.IGNORE_INDEX] * n + ids[n:], (task, ex.idx, answer)
                    lone += ids[n] == 29871
    assert lone >= 6  # the ReCoRD candidates that start with a digit

