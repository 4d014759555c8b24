"""SuperGLUE: the official files as prompts + candidates (templates of OpenLMLab/LOMO src/mydatasets.py),
the metrics, and the leaderboard's submission files.

    python superglue.py FOLDER [--output ZIP]    # pack the ten prediction files of FOLDER for the leaderboard
"""
import argparse
import collections
import json
import os
import re
import string
import tempfile
import zipfile

from data import YES_NO, Example, get_field as _get, read_jsonl, text_field as _text

TASKS = ("boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc")
DIAGNOSTICS = ("axb", "axg")  # AX-b (broad coverage) and AX-g (Winogender): test-only, predicted by the RTE model
# The folder of each task in the release, and the name of its file in a submission (<name>.jsonl).
TASK_DIRS = {"boolq": "BoolQ", "cb": "CB", "copa": "COPA", "multirc": "MultiRC", "record": "ReCoRD",
             "rte": "RTE", "wic": "WiC", "wsc": "WSC", "axb": "AX-b", "axg": "AX-g"}
SPLITS = ("train", "val", "test")
BOOL_LABELS = {False: 0, True: 1, "false": 0, "true": 1}  # official files use JSON booleans; some copies strings
# Candidate index -> the label the SuperGLUE grader expects (as in nyu-mll/jiant's super_glue_format_preds).
SUBMISSION_LABELS = {"boolq": ["false", "true"], "cb": ["entailment", "contradiction", "neutral"],
                     "copa": [0, 1], "multirc": [0, 1], "rte": ["entailment", "not_entailment"],
                     "wic": ["false", "true"], "wsc": ["False", "True"],
                     "axb": ["entailment", "not_entailment"], "axg": ["entailment", "not_entailment"]}


def check_task(task: str) -> str:
    """Lower-cased task name; ValueError listing the valid names otherwise."""
    name = str(task).lower()
    if name not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    return name


def _label(value, mapping: dict, where: str) -> int:
    try:
        return mapping[value.lower() if isinstance(value, str) else value]
    except (KeyError, TypeError):
        raise ValueError(f"{where}: label {value!r} out of range; expected one of {list(mapping)}") from None


def _gold(record, mapping, where, labelled):
    return _label(_get(record, "label", where), mapping, where) if labelled else None


def _parse_boolq(r, where, labelled):
    yield Example("boolq", _get(r, "idx", where), "", _text(r, "passage", where),
                  f" {_text(r, 'question', where)}\nAnswer: ", YES_NO, _gold(r, BOOL_LABELS, where, labelled))


def _parse_cb(r, where, labelled):
    labels = {"entailment": 0, "contradiction": 1, "neutral": 2}
    after = f" Can we infer that \"{_text(r, 'hypothesis', where)}\"? Yes, No, or Maybe?\nAnswer: "
    yield Example("cb", _get(r, "idx", where), "Suppose ", _text(r, "premise", where), after,
                  ["Yes", "No", "Maybe"], _gold(r, labels, where, labelled))


def _parse_copa(r, where, labelled):
    connective = {"cause": " because ", "effect": " so "}
    question = _get(r, "question", where)
    if question not in connective:
        raise ValueError(f"{where}: field 'question' is {question!r}; expected 'cause' or 'effect'")
    yield Example("copa", _get(r, "idx", where), "", _text(r, "premise", where), connective[question],
                  [_text(r, "choice1", where), _text(r, "choice2", where)], _gold(r, {0: 0, 1: 1}, where, labelled))


def _parse_multirc(r, where, labelled):
    """One yes/no example per answer of every question (the passage nests questions, which nest answers)."""
    p_idx, passage = _get(r, "idx", where), _get(r, "passage", where)
    paragraph = _text(passage, "text", f"{where}, passage")
    for qi, q in enumerate(_get(passage, "questions", f"{where}, passage")):
        q_where = f"{where}, passage.questions[{qi}]"
        q_idx, question = _get(q, "idx", q_where), _text(q, "question", q_where)
        for ai, a in enumerate(_get(q, "answers", q_where)):
            a_where = f"{q_where}.answers[{ai}]"
            after = (f"\nQuestion: {question}\nI found this answer \"{_text(a, 'text', a_where)}\". "
                     "Is that correct? Yes or No?\nAnswer: ")
            idx = {"paragraph": p_idx, "question": q_idx, "answer": _get(a, "idx", a_where)}
            yield Example("multirc", idx, "", paragraph, after, YES_NO,
                          _gold(a, {0: 0, 1: 1}, a_where, labelled), group=(p_idx, q_idx))


def _parse_record(r, where, labelled):
    """One example per query, as the rows of Hugging Face's super_glue loader that the paper's code reads:
    candidates are the distinct entity strings in sorted order (entity `end` offsets are inclusive), the gold is
    the first of the sorted distinct answers, and the other answers are dropped from the candidates (process_record
    in OpenLMLab/LOMO src/mydatasets.py): of "Morgan" and "Tracy Morgan", both right, "Morgan" is the gold and
    "Tracy Morgan" no candidate. `answers` keeps every gold for the metric. The order decides ties."""
    passage = _get(r, "passage", where)
    text = _text(passage, "text", f"{where}, passage")

    def entity(e, w):
        start, end = _get(e, "start", w), _get(e, "end", w)
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end < len(text)):
            raise ValueError(f"{w}: span [{start}, {end}] (inclusive) is outside the passage of {len(text)} characters")
        return text[start:end + 1]

    entities = sorted({entity(e, f"{where}, passage.entities[{i}]")
                       for i, e in enumerate(_get(passage, "entities", f"{where}, passage"))})
    shown = text.replace("@highlight\n", "- ")
    for qi, q in enumerate(_get(r, "qas", where)):
        q_where = f"{where}, qas[{qi}]"
        q_idx, query = _get(q, "idx", q_where), _text(q, "query", q_where)
        answers = []
        if labelled:
            gold = _get(q, "answers", q_where)
            if not gold:
                raise ValueError(f"{q_where}: field 'answers' is empty")
            answers = sorted({_text(a, "text", f"{q_where}.answers[{i}]") for i, a in enumerate(gold)})
        candidates = [e for e in entities if e not in answers[1:]]
        if answers and answers[0] not in candidates:  # no entity spells the gold so (the paper's code would fail)
            candidates = sorted(candidates + answers[:1])
        if not candidates:
            raise ValueError(f"{where}: field 'passage.entities' is empty, so query {q_idx} has no candidates")
        after = f"\n{query}\nQuestion: What is the \"@placeholder\"?\nAnswer: "
        yield Example("record", {"passage": _get(r, "idx", where), "query": q_idx}, "", shown, after, candidates,
                      candidates.index(answers[0]) if labelled else None, group=q_idx, answers=answers)


def _parse_rte(r, where, labelled, task="rte", premise="premise", hypothesis="hypothesis"):
    after = f"\nDoes this mean that \"{_text(r, hypothesis, where)}\" is true? Yes or No?\nAnswer: "
    yield Example(task, _get(r, "idx", where), "", _text(r, premise, where), after, ["Yes", "No"],
                  _gold(r, {"entailment": 0, "not_entailment": 1}, where, labelled))


def _parse_axb(r, where, labelled):  # RTE's prompt over sentence1 / sentence2
    return _parse_rte(r, where, labelled, "axb", "sentence1", "sentence2")


def _parse_axg(r, where, labelled):
    return _parse_rte(r, where, labelled, "axg")


def _parse_wic(r, where, labelled):  # no passage: nothing in a WiC prompt may be cut
    before = (f"Does the word \"{_text(r, 'word', where)}\" have the same meaning in these two sentences? Yes, No?\n"
              f"{_text(r, 'sentence1', where)}\n{_text(r, 'sentence2', where)}\nAnswer: ")
    yield Example("wic", _get(r, "idx", where), before, "", "", YES_NO, _gold(r, BOOL_LABELS, where, labelled))


def _parse_wsc(r, where, labelled):  # the paper's code misspells "pronoun" as "pronuon"; we do not
    target = _get(r, "target", where)
    after = (f"\nIn the previous sentence, does the pronoun \"{_text(target, 'span2_text', where + ', target')}\" "
             f"refer to \"{_text(target, 'span1_text', where + ', target')}\"? Yes or No?\nAnswer: ")
    yield Example("wsc", _get(r, "idx", where), "", _text(r, "text", where), after, YES_NO,
                  _gold(r, BOOL_LABELS, where, labelled))


PARSERS = {"boolq": _parse_boolq, "cb": _parse_cb, "copa": _parse_copa, "multirc": _parse_multirc,
           "record": _parse_record, "rte": _parse_rte, "wic": _parse_wic, "wsc": _parse_wsc,
           "axb": _parse_axb, "axg": _parse_axg}


def load_task(task: str, data_dir: str, split: str) -> list[Example]:
    """Read <data_dir>/<Task>/<split>.jsonl of the official SuperGLUE v2 release. Fields are read by name;
    the test split has no labels, so its examples get gold=None."""
    task = check_task(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    path = os.path.join(data_dir, TASK_DIRS[task], f"{split}.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SuperGLUE file not found: {path} (expected the official layout "
                                f"<data_dir>/{TASK_DIRS[task]}/{{train,val,test}}.jsonl)")
    return _read_examples(task, path, labelled=split != "test")


def load_diagnostics(data_dir: str) -> dict[str, list[Example]]:
    """AX-b and AX-g, those of <data_dir>/AX-b/AX-b.jsonl and <data_dir>/AX-g/AX-g.jsonl that exist, as RTE
    examples to predict (their labels are not read)."""
    paths = {name: os.path.join(data_dir, TASK_DIRS[name], f"{TASK_DIRS[name]}.jsonl") for name in DIAGNOSTICS}
    return {name: _read_examples(name, path, labelled=False) for name, path in paths.items() if os.path.isfile(path)}


def _read_examples(task: str, path: str, labelled: bool) -> list[Example]:
    examples, first_line = [], {}
    for line_no, record in read_jsonl(path):
        for ex in PARSERS[task](record, f"{path}, line {line_no}", labelled):
            key = json.dumps(ex.idx["query"] if task == "record" else ex.idx)  # ReCoRD is graded by query idx
            if key in first_line:
                raise ValueError(f"{path}, line {line_no}: duplicate idx {ex.idx} (first on line {first_line[key]});"
                                 " every example of a split needs its own idx")
            first_line[key] = line_no
            examples.append(ex)
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


# ------------------------------------------------------------------------------------------------- metrics

def accuracy(golds: list, preds: list) -> float:
    return sum(g == p for g, p in zip(golds, preds)) / len(golds)


def f1_for_class(golds: list, preds: list, cls) -> float:
    """F1 = 2 TP / (2 TP + FP + FN) of one class (0 when the class never occurs)."""
    tp = sum(g == cls and p == cls for g, p in zip(golds, preds))
    wrong = sum((g == cls) != (p == cls) for g, p in zip(golds, preds))  # FP + FN
    return 2 * tp / (2 * tp + wrong) if tp + wrong else 0.0


def macro_f1(golds: list, preds: list, n_classes: int) -> float:
    """Mean F1 over classes 0..n_classes-1, an absent class counting 0, as jiant's CB metric (sklearn's
    average='macro' would average only the classes that occur)."""
    return sum(f1_for_class(golds, preds, c) for c in range(n_classes)) / n_classes


def group_exact_match(groups: list, golds: list, preds: list) -> float:
    """Fraction of groups (MultiRC questions) whose every answer is predicted right."""
    correct = {}
    for group, g, p in zip(groups, golds, preds):
        correct[group] = correct.get(group, True) and g == p
    return sum(correct.values()) / len(correct)


PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD / ReCoRD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def compute_metrics(task: str, examples: list[Example], predictions: list[int]) -> dict[str, float]:
    """accuracy for every task; CB adds macro-F1 over its 3 classes ('f1'); MultiRC adds F1 over all answers
    ('f1a') and exact match per question ('em'); ReCoRD adds token F1 ('f1') and exact match ('em'), each the max
    over golds."""
    task = "synthetic" if str(task).lower() == "synthetic" else check_task(task)
    if len(examples) != len(predictions) or not examples:
        raise ValueError(f"{len(examples)} examples but {len(predictions)} predictions")
    if any(ex.gold is None for ex in examples):
        raise ValueError(f"{task}: some examples have no label (test split?); metrics need labelled examples")
    golds = [ex.gold for ex in examples]
    metrics = {"accuracy": accuracy(golds, predictions)}
    if task == "cb":
        metrics["f1"] = macro_f1(golds, predictions, n_classes=3)
    elif task == "multirc":
        metrics["f1a"] = f1_for_class(golds, predictions, 1)
        metrics["em"] = group_exact_match([ex.group for ex in examples], golds, predictions)
    elif task == "record":
        texts = [ex.candidates[p] for ex, p in zip(examples, predictions)]
        metrics["f1"] = sum(max(token_f1(t, a) for a in ex.answers) for ex, t in zip(examples, texts)) / len(texts)
        metrics["em"] = sum(max(normalize_answer(t) == normalize_answer(a) for a in ex.answers)
                            for ex, t in zip(examples, texts)) / len(texts)
    return metrics


def write_predictions(task: str, examples: list[Example], predictions: list[int], out_dir: str) -> str:
    """Write <out_dir>/<Task>.jsonl in the SuperGLUE submission format, as nyu-mll/jiant's formatter writes it:
    {"idx", "label"} per line, labels in the task's own vocabulary (WSC "True"/"False"), MultiRC's answers nested
    in questions in passages, ReCoRD's label the answer text, AX-b's string idx as a number. Atomic: temp file,
    then rename."""
    task = task if task in DIAGNOSTICS else check_task(task)
    if len(examples) != len(predictions):
        raise ValueError(f"{len(examples)} examples but {len(predictions)} predictions")
    if task == "record":
        rows = [{"idx": ex.idx["query"], "label": ex.candidates[p]} for ex, p in zip(examples, predictions)]
    elif task == "multirc":
        passages = collections.defaultdict(lambda: collections.defaultdict(list))
        for ex, p in zip(examples, predictions):
            passages[ex.idx["paragraph"]][ex.idx["question"]].append({"idx": ex.idx["answer"], "label": int(p)})
        rows = [{"idx": p_idx, "passage": {"questions": [{"idx": q_idx, "answers": answers}
                                                         for q_idx, answers in questions.items()]}}
                for p_idx, questions in passages.items()]
    else:
        rows = [{"idx": int(ex.idx) if str(ex.idx).isdigit() else ex.idx, "label": SUBMISSION_LABELS[task][p]}
                for ex, p in zip(examples, predictions)]
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{TASK_DIRS[task]}.jsonl")
    _write_atomically(path, lambda f: f.writelines((json.dumps(row) + "\n").encode() for row in rows))
    return path


def _write_atomically(path: str, write) -> None:
    """write(binary file) into a temporary file beside `path`, then rename it to `path`. The file gets the
    permissions that a plain open() gives (mkstemp makes it 0600)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


SUBMISSION_FILES = [f"{name}.jsonl" for name in TASK_DIRS.values()]  # the ten files of a full submission


def pack_submission(folder: str, zip_path: str) -> str:
    """Zip the ten prediction files of `folder` (train.py --predict writes them, RTE's run also AX-b's and AX-g's)
    at the top level of `zip_path`, the archive that super.gluebenchmark.com takes. Every file must be there and
    hold JSON lines with an idx; an existing archive is never overwritten."""
    missing = [name for name in SUBMISSION_FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}: a SuperGLUE submission needs all ten files "
                                "(train.py --task T --predict writes T's; --task rte also AX-b's and AX-g's)")
    for name in SUBMISSION_FILES:
        path = os.path.join(folder, name)
        rows = list(read_jsonl(path))
        if not rows:
            raise ValueError(f"{path} holds no predictions")
        for line_no, row in rows:
            if not isinstance(row, dict) or "idx" not in row:
                raise ValueError(f"{path}, line {line_no}: not a prediction (no 'idx'); was it written by --predict?")
    if os.path.exists(zip_path):
        raise FileExistsError(f"{zip_path} exists; remove it or name another --output")

    def write_zip(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as archive:
            for name in SUBMISSION_FILES:
                archive.write(os.path.join(folder, name), arcname=name)
    _write_atomically(zip_path, write_zip)
    return zip_path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Pack the ten SuperGLUE prediction files of FOLDER into the zip "
                                     "that the leaderboard takes.")
    parser.add_argument("folder", help="holds BoolQ.jsonl ... WSC.jsonl, AX-b.jsonl and AX-g.jsonl")
    parser.add_argument("--output", help="the zip to write (default: FOLDER.zip beside FOLDER)")
    cli = parser.parse_args()
    try:
        print("wrote", pack_submission(cli.folder, cli.output or os.path.normpath(cli.folder) + ".zip"))
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
