"""Data for LOMO / AdaLomo fine-tuning: the LLaMA tokenizer, SuperGLUE prompts, candidate scoring, metrics.

Every example is a prompt plus candidate answers, as in the paper's SuperGLUE experiments (arXiv 2306.09782;
templates from OpenLMLab/LOMO src/mydatasets.py). Training teaches prompt + gold answer + EOS; evaluation picks
the candidate whose tokens and the EOS after them have the highest summed log-likelihood given the prompt.
"""
import collections
import json
import os
import random
import re
import string
import tempfile
from dataclasses import dataclass, field
from typing import Optional

import sentencepiece as spm
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt and padding)


# ----------------------------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """A sentencepiece model, e.g. LLaMA's tokenizer.model (32,000 pieces, bos=1, eos=2, no pad).

    Padding strategy: LLaMA has no pad piece, so pad_id is the model's own pad id when it has one and otherwise
    its <unk> id (0 for LLaMA). Batches are padded on the right and pads always get label -100, so a pad is never
    a target and, the model being causal, no real token ever attends to one.
    """

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model not found: {model_path} "
                                    "(expected a sentencepiece .model file such as LLaMA's tokenizer.model)")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{model_path} is not a sentencepiece model ({e}); "
                             "pass LLaMA's tokenizer.model or one made by train_tokenizer()") from None
        self.n_words = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{model_path} defines no BOS or EOS piece; both are needed")

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))


def train_tokenizer(texts: list[str], model_prefix: str, vocab_size: int) -> str:
    """Train a small BPE sentencepiece model laid out like LLaMA's (unk=0, bos=1, eos=2, no pad, digits split,
    byte fallback so any text encodes). Writes `<model_prefix>.model` atomically and returns its path.
    Byte fallback needs vocab_size >= 259 + the number of distinct characters in `texts`."""
    path = model_prefix + ".model"
    out_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts), model_prefix=os.path.join(tmp, "spm"), vocab_size=vocab_size,
                model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
                unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
                remove_extra_whitespaces=False, hard_vocab_limit=False, minloglevel=2)
        except RuntimeError as e:
            raise ValueError(f"sentencepiece could not train {path} with vocab_size={vocab_size}: {e}") from None
        os.replace(os.path.join(tmp, "spm.model"), path)
    return path


# ------------------------------------------------------------------------------------------- SuperGLUE files

TASKS = ("boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc")
TASK_DIRS = {"boolq": "BoolQ", "cb": "CB", "copa": "COPA", "multirc": "MultiRC", "record": "ReCoRD",
             "rte": "RTE", "wic": "WiC", "wsc": "WSC"}
SPLITS = ("train", "val", "test")
YES_NO = ["No", "Yes"]
BOOL_LABELS = {False: 0, True: 1, "false": 0, "true": 1}  # official files use JSON booleans; some copies strings
# Candidate index -> the label the SuperGLUE grader expects (as in nyu-mll/jiant's super_glue_format_preds).
SUBMISSION_LABELS = {"boolq": ["false", "true"], "cb": ["entailment", "contradiction", "neutral"],
                     "copa": [0, 1], "multirc": [0, 1], "rte": ["entailment", "not_entailment"],
                     "wic": ["false", "true"], "wsc": ["False", "True"]}


@dataclass
class Example:
    """One prompt with its candidate answers. prompt = before + passage + after; only `passage` is ever cut."""
    task: str
    idx: object               # official idx: int; MultiRC {paragraph, question, answer}; ReCoRD {passage, query}
    before: str
    passage: str
    after: str
    candidates: list[str]
    gold: Optional[int]       # index into candidates; None when unlabelled (test split)
    group: object = None      # unit of exact match and sampling: MultiRC (paragraph, question), ReCoRD query idx
    answers: list[str] = field(default_factory=list)  # ReCoRD: every distinct gold answer, for the metric

    def __post_init__(self):
        self.candidates = list(self.candidates)  # never share one list between examples
        if self.group is None:
            self.group = self.idx

    @property
    def prompt(self) -> str:
        return self.before + self.passage + self.after


def check_task(task: str) -> str:
    """Lower-cased task name; ValueError listing the valid names otherwise."""
    name = str(task).lower()
    if name not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    return name


def _get(record: dict, key: str, where: str):
    if not isinstance(record, dict) or key not in record:
        raise ValueError(f"{where}: missing field {key!r}")
    return record[key]


def _label(value, mapping: dict, where: str) -> int:
    try:
        return mapping[value.lower() if isinstance(value, str) else value]
    except (KeyError, TypeError):
        raise ValueError(f"{where}: label {value!r} out of range; expected one of {list(mapping)}") from None


def _gold(record, mapping, where, labelled):
    return _label(_get(record, "label", where), mapping, where) if labelled else None


def _parse_boolq(r, where, labelled):
    yield Example("boolq", _get(r, "idx", where), "", _get(r, "passage", where),
                  f" {_get(r, 'question', where)}\nAnswer: ", YES_NO, _gold(r, BOOL_LABELS, where, labelled))


def _parse_cb(r, where, labelled):
    labels = {"entailment": 0, "contradiction": 1, "neutral": 2}
    after = f" Can we infer that \"{_get(r, 'hypothesis', where)}\"? Yes, No, or Maybe?\nAnswer: "
    yield Example("cb", _get(r, "idx", where), "Suppose ", _get(r, "premise", where), after,
                  ["Yes", "No", "Maybe"], _gold(r, labels, where, labelled))


def _parse_copa(r, where, labelled):
    connective = {"cause": " because ", "effect": " so "}
    question = _get(r, "question", where)
    if question not in connective:
        raise ValueError(f"{where}: field 'question' is {question!r}; expected 'cause' or 'effect'")
    yield Example("copa", _get(r, "idx", where), "", _get(r, "premise", where), connective[question],
                  [_get(r, "choice1", where), _get(r, "choice2", where)], _gold(r, {0: 0, 1: 1}, where, labelled))


def _parse_multirc(r, where, labelled):
    """One yes/no example per answer of every question (the passage nests questions, which nest answers)."""
    p_idx, passage = _get(r, "idx", where), _get(r, "passage", where)
    paragraph = _get(passage, "text", f"{where}, passage")
    for qi, q in enumerate(_get(passage, "questions", f"{where}, passage")):
        q_where = f"{where}, passage.questions[{qi}]"
        q_idx, question = _get(q, "idx", q_where), _get(q, "question", q_where)
        for ai, a in enumerate(_get(q, "answers", q_where)):
            a_where = f"{q_where}.answers[{ai}]"
            after = (f"\nQuestion: {question}\nI found this answer \"{_get(a, 'text', a_where)}\". "
                     "Is that correct? Yes or No?\nAnswer: ")
            idx = {"paragraph": p_idx, "question": q_idx, "answer": _get(a, "idx", a_where)}
            yield Example("multirc", idx, "", paragraph, after, YES_NO,
                          _gold(a, {0: 0, 1: 1}, a_where, labelled), group=(p_idx, q_idx))


def _parse_record(r, where, labelled):
    """One example per query. Entity/answer `end` offsets are inclusive. Candidates are the distinct entity
    strings in passage order; as in the paper's code, gold answers other than the first are dropped from them,
    so exactly one candidate is gold, while `answers` keeps every gold string for the metric."""
    passage = _get(r, "passage", where)
    text = _get(passage, "text", f"{where}, passage")

    def span(e, w):
        start, end = _get(e, "start", w), _get(e, "end", w)
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end < len(text)):
            raise ValueError(f"{w}: span [{start}, {end}] (inclusive) is outside the passage of {len(text)} characters")
        return start, text[start:end + 1]

    spans = [span(e, f"{where}, passage.entities[{i}]")
             for i, e in enumerate(_get(passage, "entities", f"{where}, passage"))]
    shown = text.replace("@highlight\n", "- ")
    for qi, q in enumerate(_get(r, "qas", where)):
        q_where = f"{where}, qas[{qi}]"
        q_idx, query = _get(q, "idx", q_where), _get(q, "query", q_where)
        answers, gold_span = [], []
        if labelled:
            gold = _get(q, "answers", q_where)
            if not gold:
                raise ValueError(f"{q_where}: field 'answers' is empty")
            answers = list(dict.fromkeys(_get(a, "text", f"{q_where}.answers[{i}]") for i, a in enumerate(gold)))
            # the first gold is a candidate even if no entity spells it the same way
            gold_span = [(span(gold[0], f"{q_where}.answers[0]")[0], answers[0])]
        drop = set(answers[1:])
        candidates = [t for t in dict.fromkeys(t for _, t in sorted(spans + gold_span)) if t not in drop]
        if not candidates:
            raise ValueError(f"{where}: field 'passage.entities' is empty, so query {q_idx} has no candidates")
        after = f"\n{query}\nQuestion: What is the \"@placeholder\"?\nAnswer: "
        yield Example("record", {"passage": _get(r, "idx", where), "query": q_idx}, "", shown, after, candidates,
                      candidates.index(answers[0]) if labelled else None, group=q_idx, answers=answers)


def _parse_rte(r, where, labelled):
    after = f"\nDoes this mean that \"{_get(r, 'hypothesis', where)}\" is true? Yes or No?\nAnswer: "
    yield Example("rte", _get(r, "idx", where), "", _get(r, "premise", where), after, ["Yes", "No"],
                  _gold(r, {"entailment": 0, "not_entailment": 1}, where, labelled))


def _parse_wic(r, where, labelled):  # no passage: nothing in a WiC prompt may be cut
    before = (f"Does the word \"{_get(r, 'word', where)}\" have the same meaning in these two sentences? Yes, No?\n"
              f"{_get(r, 'sentence1', where)}\n{_get(r, 'sentence2', where)}\nAnswer: ")
    yield Example("wic", _get(r, "idx", where), before, "", "", YES_NO, _gold(r, BOOL_LABELS, where, labelled))


def _parse_wsc(r, where, labelled):  # the paper's code misspells "pronoun" as "pronuon"; we do not
    target = _get(r, "target", where)
    after = (f"\nIn the previous sentence, does the pronoun \"{_get(target, 'span2_text', where + ', target')}\" "
             f"refer to \"{_get(target, 'span1_text', where + ', target')}\"? Yes or No?\nAnswer: ")
    yield Example("wsc", _get(r, "idx", where), "", _get(r, "text", where), after, YES_NO,
                  _gold(r, BOOL_LABELS, where, labelled))


PARSERS = {"boolq": _parse_boolq, "cb": _parse_cb, "copa": _parse_copa, "multirc": _parse_multirc,
           "record": _parse_record, "rte": _parse_rte, "wic": _parse_wic, "wsc": _parse_wsc}


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
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e.msg}, column {e.colno})") from None
            examples.extend(PARSERS[task](record, where, labelled=split != "test"))
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


# ------------------------------------------------------------------------------------------ synthetic task

def synthetic_task(n: int, seed: int) -> list[Example]:
    """Yes/no comparisons of two distinct digits ("Is 7 greater than 3? Yes or No?"), task 'synthetic'.
    90 distinct prompts, half of them 'Yes'. A tiny model learns it with LOMO in about a minute on a CPU (after a
    plateau at chance of about 1000 steps). Mixing in "less than" questions makes every single digit
    uninformative on its own, and plain SGD then stays at chance far longer."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        a, b = rng.sample(range(10), 2)
        examples.append(Example("synthetic", i, f"Is {a} greater than {b}? Yes or No?\nAnswer: ", "", "",
                                YES_NO, int(a > b)))
    return examples


def synthetic_texts(n: int = 1000, seed: int = 0) -> list[str]:
    """Corpus for train_tokenizer(): synthetic prompts followed by each candidate (vocab_size ~ 320 suffices)."""
    return [ex.prompt + c for ex in synthetic_task(n, seed) for c in ex.candidates]


# ------------------------------------------------------------------------------------ encoding and batching

def _cut_middle(passage: str, keep: int) -> str:
    """The passage with its middle replaced by ' ... ', keeping `keep` characters from its two ends."""
    if keep >= len(passage):
        return passage
    if keep <= 0:
        return ""
    head = (keep + 1) // 2
    return passage[:head] + " ... " + passage[len(passage) - (keep - head):]


def fit_prompt(tok: Tokenizer, ex: Example, max_len: int) -> str:
    """The prompt, with the passage cut in the middle just enough that BOS + prompt + every candidate + EOS fits
    in max_len tokens. The middle goes because the start (BoolQ's title) and the end (ReCoRD's highlights) matter
    most. The question and the answers are never cut; if they alone do not fit, ValueError."""
    def fits(prompt, candidates=ex.candidates):
        return all(len(tok.encode(prompt + c, bos=True, eos=True)) <= max_len for c in candidates)

    def cut(keep):
        return ex.before + _cut_middle(ex.passage, keep) + ex.after

    if fits(ex.prompt):
        return ex.prompt
    if not fits(cut(0)):
        raise ValueError(f"{ex.task} example {ex.idx}: even with the passage removed, the prompt and its longest "
                         f"answer do not fit in max_len={max_len} tokens; raise max_len")
    # Binary search for the most passage characters that fit with the longest answer; `lo` always fits.
    longest = [max(ex.candidates, key=lambda c: len(tok.encode(c, bos=False, eos=False)))]
    lo, hi = 0, len(ex.passage)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(cut(mid), longest) else (lo, mid - 1)
    while not fits(cut(lo)):  # rare: another answer joins the prompt into more tokens
        lo = lo * 15 // 16
    return cut(lo)


def _encode_answer(tok: Tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """BOS + prompt + answer + EOS, encoded jointly. The answer's tokens are those after the longest common
    prefix with the prompt's own encoding: LLaMA encodes "Answer: " as [..., ':', '▁'] but "Answer: Yes" as
    [..., ':', '▁Yes'], so the lone '▁' merges into the answer's first token."""
    prompt_ids = tok.encode(prompt, bos=True, eos=False)
    ids = tok.encode(prompt + answer, bos=True, eos=True)
    n = 0
    while n < min(len(prompt_ids), len(ids) - 1) and prompt_ids[n] == ids[n]:
        n += 1
    return ids, [IGNORE_INDEX] * n + ids[n:]


def encode_train(tok: Tokenizer, ex: Example, max_len: int) -> tuple[list[int], list[int]]:
    """(ids, labels) of prompt + gold answer + EOS; labels are -100 except on the answer tokens and EOS."""
    if ex.gold is None:
        raise ValueError(f"{ex.task} example {ex.idx} has no label (test split?); it cannot be trained on")
    return _encode_answer(tok, fit_prompt(tok, ex, max_len), ex.candidates[ex.gold])


def encode_candidates(tok: Tokenizer, ex: Example, max_len: int) -> list[tuple[list[int], list[int]]]:
    """One (ids, labels) per candidate, all sharing the same (possibly cut) prompt; masking as encode_train."""
    prompt = fit_prompt(tok, ex, max_len)
    return [_encode_answer(tok, prompt, c) for c in ex.candidates]


def collate(seqs: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) tokens and labels, padded on the right to the longest sequence; labels are -100 on pads."""
    if not seqs:
        raise ValueError("collate() needs at least one sequence")
    T = max(len(ids) for ids, _ in seqs)
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, labs) in enumerate(seqs):
        if len(ids) != len(labs):
            raise ValueError(f"sequence {i}: {len(ids)} tokens but {len(labs)} labels")
        tokens[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[i, :len(labs)] = torch.tensor(labs, dtype=torch.long)
    return tokens, labels


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) labels -> (B,) summed log-likelihood of the labelled tokens, in fp32.
    labels[:, t] is predicted by logits[:, t-1]; -100 is ignored."""
    logits, targets = logits[:, :-1].float(), labels[:, 1:]                 # (B, T-1, V), (B, T-1)
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.sum(dim=1)                                                  # (B,)


def candidate_batches(n_candidates: list[int], batch_size: int) -> list[list[int]]:
    """Group example indices so that all candidates of an example share one batch of at most batch_size
    sequences (an example with more candidates than batch_size gets a batch of its own)."""
    batches, current, size = [], [], 0
    for i, n in enumerate(n_candidates):
        if current and size + n > batch_size:
            batches.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    return batches + [current] if current else batches


@torch.no_grad()
def score_candidates(logits_fn, tok: Tokenizer, examples: list[Example], max_len: int,
                     batch_size: int) -> list[list[float]]:
    """Summed log-likelihood of every candidate's tokens and the EOS after them, given the prompt. The paper's
    code counts EOS too, which stops a prefix ("Morgan") from beating the full answer ("Tracy Morgan").
    logits_fn maps (B, T) tokens on the CPU to (B, T, V) logits (it moves them to its device itself)."""
    encoded = [encode_candidates(tok, ex, max_len) for ex in examples]
    scores = [None] * len(examples)
    for batch in candidate_batches([len(e) for e in encoded], batch_size):
        tokens, labels = collate([seq for i in batch for seq in encoded[i]], tok.pad_id)
        logits = logits_fn(tokens)                                          # (B, T, V)
        flat = sequence_logprobs(logits, labels.to(logits.device)).tolist()
        for i in batch:
            scores[i], flat = flat[:len(encoded[i])], flat[len(encoded[i]):]
    return scores


def predict(examples: list[Example], scores: list[list[float]]) -> list[int]:
    """Index of the highest-scoring candidate of each example."""
    if len(examples) != len(scores):
        raise ValueError(f"{len(examples)} examples but {len(scores)} score lists")
    for ex, s in zip(examples, scores):
        if len(s) != len(ex.candidates):
            raise ValueError(f"{ex.task} example {ex.idx}: {len(ex.candidates)} candidates but {len(s)} scores")
    return [max(range(len(s)), key=s.__getitem__) for s in scores]


def sample_examples(examples: list[Example], n: int, seed: int) -> list[Example]:
    """About n examples drawn with a fixed seed, taking whole groups (a MultiRC question with all its answers,
    a ReCoRD query), so the last group taken may overshoot n. n >= len(examples) returns all. Order is kept."""
    if n < 1:
        raise ValueError(f"cannot sample n={n} examples; n must be at least 1")
    if n >= len(examples):
        return list(examples)
    groups = collections.defaultdict(list)
    for i, ex in enumerate(examples):
        groups[ex.group].append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    chosen = []
    for members in order:
        if len(chosen) >= n:
            break
        chosen.extend(members)
    return [examples[i] for i in sorted(chosen)]


def epoch_batches(n: int, batch_size: int, world_size: int, rank: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's share of every global batch of one epoch. Indices 0..n-1 are shuffled deterministically by
    (seed, epoch) and cut into global batches of batch_size * world_size; rank r takes every world_size-th index
    of each, starting at r. Every rank gets the same number of batches; in the last one a rank's slice may be
    shorter or empty. Together the ranks cover every index exactly once."""
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1, world_size >= 1 and 0 <= rank < world_size; got "
                         f"batch_size={batch_size}, world_size={world_size}, rank={rank}")
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    step = batch_size * world_size
    return [order[start:start + step][rank::world_size] for start in range(0, n, step)]


# ------------------------------------------------------------------------------------------------- metrics

def accuracy(golds: list, preds: list) -> float:
    return sum(g == p for g, p in zip(golds, preds)) / len(golds)


def f1_for_class(golds: list, preds: list, cls) -> float:
    """F1 = 2 TP / (2 TP + FP + FN) of one class (0 when the class never occurs)."""
    tp = sum(g == cls and p == cls for g, p in zip(golds, preds))
    wrong = sum((g == cls) != (p == cls) for g, p in zip(golds, preds))  # FP + FN
    return 2 * tp / (2 * tp + wrong) if tp + wrong else 0.0


def macro_f1(golds: list, preds: list) -> float:
    """Mean per-class F1 over the classes seen in golds or preds (as sklearn's average='macro')."""
    classes = sorted(set(golds) | set(preds))
    return sum(f1_for_class(golds, preds, c) for c in classes) / len(classes)


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
    """accuracy for every task; CB adds macro-F1 ('f1'); MultiRC adds F1 over all answers ('f1a') and exact
    match per question ('em'); ReCoRD adds token F1 ('f1') and exact match ('em'), each the max over golds."""
    task = "synthetic" if str(task).lower() == "synthetic" else check_task(task)
    if len(examples) != len(predictions) or not examples:
        raise ValueError(f"{len(examples)} examples but {len(predictions)} predictions")
    if any(ex.gold is None for ex in examples):
        raise ValueError(f"{task}: some examples have no label (test split?); metrics need labelled examples")
    golds = [ex.gold for ex in examples]
    metrics = {"accuracy": accuracy(golds, predictions)}
    if task == "cb":
        metrics["f1"] = macro_f1(golds, predictions)
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
    """Write <out_dir>/<Task>.jsonl in the SuperGLUE submission format ({"idx", "label"} per line, labels in
    the task's own vocabulary; MultiRC nests answers in questions in passages). Atomic: temp file, then rename."""
    task = check_task(task)
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
        rows = [{"idx": ex.idx, "label": SUBMISSION_LABELS[task][p]} for ex, p in zip(examples, predictions)]
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{TASK_DIRS[task]}.jsonl")
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{TASK_DIRS[task]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
