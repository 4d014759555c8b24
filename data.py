"""Data for LOMO / AdaLomo fine-tuning: examples as a prompt plus candidate answers, their encoding, batching and
scoring, and the synthetic demo task.

Every example is a prompt plus candidate answers, as in the paper's SuperGLUE experiments (arXiv 2306.09782;
templates from OpenLMLab/LOMO src/mydatasets.py). Training teaches prompt + gold answer + EOS; evaluation picks
the candidate whose tokens and the EOS after them have the highest summed log-likelihood given the prompt.
"""
import collections
import json
import math
import os
import random
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from tokenizer import Tokenizer

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt and padding)
YES_NO = ["No", "Yes"]


@dataclass
class Example:
    """One prompt with its candidate answers. prompt = before + passage + after; only `passage` is ever cut."""
    task: str
    idx: object               # official idx: int (AX-b: str); MultiRC {paragraph, question, answer}; ReCoRD
                              # {passage, query}; jsonl "<file>, line <n>"
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


# ------------------------------------------------------------------------------------------- reading files

def read_jsonl(path: str):
    """(line number, record) for every non-blank line of a JSON-lines file (a UTF-8 byte-order mark is allowed).
    Invalid UTF-8 or JSON is a ValueError that names the file and line."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            where = f"{path}, line {line_no}"
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                 "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e.msg}, column {e.colno})") from None


def get_field(record: dict, key: str, where: str):
    """record[key]; ValueError naming the place and the field when `record` is no object or lacks it."""
    if not isinstance(record, dict) or key not in record:
        raise ValueError(f"{where}: missing field {key!r}")
    return record[key]


def text_field(record: dict, key: str, where: str) -> str:
    """record[key], which must be text; ValueError naming the place and the field otherwise."""
    return check_text(get_field(record, key, where), f"field {key!r}", where)


def check_text(text, what: str, where: str) -> str:
    """`text` if it is a string that encodes as UTF-8, i.e. holds no lone surrogate (an unpaired \\ud83d escape)."""
    if not isinstance(text, str):
        raise ValueError(f"{where}: {what} is {json.dumps(text)}; it must be text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where}: {what} holds a lone surrogate {text[e.start]!r} at character {e.start + 1} "
                         "(half of a \\uXXXX pair); fix that escape") from None
    return text


# -------------------------------------------------------------------------------------------- your own data

def load_jsonl(path: str) -> list[Example]:
    """Your own data (--task jsonl): one JSON object per line, either
        {"prompt": "...", "completion": "..."}                       train on the completion
        {"prompt": "...", "candidates": ["...", "..."], "label": i}  train on candidates[i]; scored by accuracy too
    Other keys are ignored. Nothing is added between prompt and answer, and the prompt is never cut."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: --task jsonl needs train.jsonl and val.jsonl in --data-dir")
    examples = []
    for line_no, row in read_jsonl(path):
        where = f"{path}, line {line_no}"
        if not isinstance(row, dict) or ("completion" in row) == ("candidates" in row):
            raise ValueError(f"{where}: expected an object with \"prompt\" and either \"completion\", or "
                             "\"candidates\" and \"label\"")
        prompt = text_field(row, "prompt", where)
        if "completion" in row:
            candidates, gold = [text_field(row, "completion", where)], 0
        else:
            candidates, gold = row["candidates"], row.get("label")
            if not isinstance(candidates, list) or len(candidates) < 2:
                raise ValueError(f"{where}: field 'candidates' must be a list of at least 2 texts")
            candidates = [check_text(c, f"candidates[{i}]", where) for i, c in enumerate(candidates)]
            if type(gold) is not int or not 0 <= gold < len(candidates):
                raise ValueError(f"{where}: field 'label' is {json.dumps(gold)}; it must be the index of the right "
                                 f"candidate, 0 to {len(candidates) - 1}")
        examples.append(Example("jsonl", where, prompt, "", "", candidates, gold))
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def answer_metrics(tok: Tokenizer, examples: list[Example], scores: list[list[float]],
                   max_len: int) -> dict[str, float]:
    """Mean negative log-likelihood per target token of the gold answers ('nll': the completion's tokens and the
    EOS after it, the tokens trained on) and its exp ('perplexity'); plus 'accuracy' by candidate scoring over the
    examples that have candidates to choose from."""
    n_tokens = sum(sum(lab != IGNORE_INDEX for lab in encode_train(tok, ex, max_len)[1][1:]) for ex in examples)
    nll = -sum(s[ex.gold] for ex, s in zip(examples, scores)) / n_tokens
    metrics = {"nll": nll, "perplexity": math.exp(nll) if nll < 700 else math.inf}
    choices = [(ex.gold, pred) for ex, pred in zip(examples, predict(examples, scores)) if len(ex.candidates) > 1]
    if choices:
        metrics["accuracy"] = sum(gold == pred for gold, pred in choices) / len(choices)
    return metrics


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
        removed = "even with the passage removed, " if ex.passage else ""
        raise ValueError(f"{ex.task} example {ex.idx}: {removed}the prompt and its longest answer do not fit in "
                         f"max_len={max_len} tokens; raise max_len (--max-len)")
    # Binary search for the most passage characters that fit with the longest answer; `lo` always fits.
    longest = [max(ex.candidates, key=lambda c: len(tok.encode(c, bos=False, eos=False)))]
    lo, hi = 0, len(ex.passage)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(cut(mid), longest) else (lo, mid - 1)
    while not fits(cut(lo)):  # rare: another answer joins the prompt into more tokens
        lo = lo * 15 // 16
    return cut(lo)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _encode_answers(tok: Tokenizer, prompt: str, answers: list[str]) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of BOS + prompt + answer + EOS for every answer, each encoded jointly; labels are -100 on a
    prefix that all answers share with the prompt's own encoding, and the tokens after it are the targets.

    The prompt's last token may merge with an answer: LLaMA encodes "Answer: " as [..., ':', '▁'] and
    "Answer: Yes" as [..., ':', '▁Yes'], while "Answer: 3-D" keeps the lone '▁' ([..., ':', '▁', '3', ...]). The
    scored part starts at the same token for every answer, here after ':', so that the scores of an example are
    probabilities of the same event ("3-D" pays for its '▁' too). That is the official rule, labels[:len(source)
    - 1] masked (OpenLMLab/LOMO src/mydatasets.py _tokenize_fn), wherever an answer absorbs the prompt's last
    token; and a lone answer (a completion) is scored from its first token that differs from the prompt's."""
    prompt_ids = tok.encode(prompt, bos=True, eos=False)
    seqs = [tok.encode(prompt + answer, bos=True, eos=True) for answer in answers]
    n = min(min(_common_prefix(prompt_ids, ids), len(ids) - 1) for ids in seqs)
    return [(ids, [IGNORE_INDEX] * n + ids[n:]) for ids in seqs]


def encode_train(tok: Tokenizer, ex: Example, max_len: int) -> tuple[list[int], list[int]]:
    """(ids, labels) of prompt + gold answer + EOS, exactly as encode_candidates() scores the gold answer."""
    if ex.gold is None:
        raise ValueError(f"{ex.task} example {ex.idx} has no label (test split?); it cannot be trained on")
    return encode_candidates(tok, ex, max_len)[ex.gold]


def encode_candidates(tok: Tokenizer, ex: Example, max_len: int) -> list[tuple[list[int], list[int]]]:
    """One (ids, labels) per candidate, all sharing the same (possibly cut) prompt and the same unscored prefix;
    labels are -100 except on the answer tokens (from the prompt's last token on, see _encode_answers) and EOS."""
    return _encode_answers(tok, fit_prompt(tok, ex, max_len), ex.candidates)


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


def scored_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) labels -> flat indices b * T + t (N,) of the positions whose next token is scored, and those tokens
    (N,): position t predicts labels[:, t + 1], and -100 is not scored."""
    b, t = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)        # (N,), (N,)
    return b * labels.shape[1] + t, labels[b, t + 1]


def sequence_logprobs(logits_fn, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T) tokens and labels -> (B,) summed log-likelihood of each sequence's labelled tokens, in fp32.
    logits_fn(tokens, logits_at) returns the logits at the scored positions only, (N, V): the output projection
    and the log-softmax of the prompt's positions (hundreds per answer token) are never computed."""
    positions, targets = scored_positions(labels)
    logits = logits_fn(tokens, positions)                                   # (N, V)
    token_logprobs = -F.cross_entropy(logits.float(), targets.to(logits.device), reduction="none")  # (N,)
    rows = (positions // tokens.shape[1]).to(logits.device)                 # (N,) the sequence of each
    return logits.new_zeros(len(tokens), dtype=torch.float32).index_add_(0, rows, token_logprobs)


def scoring_batches(lengths: list[list[int]], batch_size: int) -> list[list[tuple[int, int]]]:
    """(example, candidate) pairs in batches of at most batch_size sequences, longest first: neighbours in length
    share a batch, so that little of it is padding, and the largest batch runs first (memory runs out at once,
    if it does). lengths[i][j]: tokens of example i's candidate j. An example's candidates need not share a batch:
    each sequence's score is its own."""
    order = sorted(((i, j) for i, seqs in enumerate(lengths) for j in range(len(seqs))),
                   key=lambda ij: -lengths[ij[0]][ij[1]])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def count_scoring_batches(n_sequences: int, batch_size: int) -> int:
    """How many batches scoring_batches() makes of n_sequences, known before anything is encoded."""
    return -(-n_sequences // batch_size)


@torch.no_grad()
def score_sequences(logits_fn, encoded: list[list[tuple[list[int], list[int]]]], batch_size: int,
                    pad_id: int) -> list[list[float]]:
    """sequence_logprobs() of every (ids, labels) encoded[i][j], batched by scoring_batches(); the same nesting."""
    batches = scoring_batches([[len(ids) for ids, _ in seqs] for seqs in encoded], batch_size)
    per_batch = []
    for batch in batches:
        tokens, labels = collate([encoded[i][j] for i, j in batch], pad_id)
        per_batch.append(sequence_logprobs(logits_fn, tokens, labels))     # (B,), left on the device
    flat = torch.cat(per_batch).tolist() if per_batch else []              # one host synchronisation
    scores = [[0.0] * len(seqs) for seqs in encoded]
    for (i, j), score in zip([ij for batch in batches for ij in batch], flat):
        scores[i][j] = score
    return scores


def score_candidates(logits_fn, tok: Tokenizer, examples: list[Example], max_len: int,
                     batch_size: int) -> list[list[float]]:
    """Summed log-likelihood of every candidate's tokens and the EOS after them, given the prompt. The paper's
    code counts EOS too, which stops a prefix ("Morgan") from beating the full answer ("Tracy Morgan").
    logits_fn(tokens, logits_at) maps (B, T) tokens and flat positions b * T + t (N,), both on the CPU, to the
    logits at those positions (N, V), as model.Transformer's forward does (it moves them to its device itself)."""
    encoded = [encode_candidates(tok, ex, max_len) for ex in examples]
    return score_sequences(logits_fn, encoded, batch_size, tok.pad_id)


def predict(examples: list[Example], scores: list[list[float]]) -> list[int]:
    """Index of the highest-scoring candidate of each example."""
    if len(examples) != len(scores):
        raise ValueError(f"{len(examples)} examples but {len(scores)} score lists")
    for ex, s in zip(examples, scores):
        if len(s) != len(ex.candidates):
            raise ValueError(f"{ex.task} example {ex.idx}: {len(ex.candidates)} candidates but {len(s)} scores")
    return [max(range(len(s)), key=s.__getitem__) for s in scores]


# ------------------------------------------------------------------------------------------------ sampling

def paper_subset(examples: list[Example], n: int) -> list[Example]:
    """The paper's subset (OpenLMLab/LOMO src/mydatasets.py): n rows drawn by random.sample after random.seed(0),
    whatever the training seed, in the order drawn; all rows when there are no more than n. A row is an example:
    a MultiRC answer, a ReCoRD query, as in Hugging Face's super_glue, from which the paper's code samples."""
    if n < 1:
        raise ValueError(f"cannot sample n={n} examples; n must be at least 1")
    if n >= len(examples):
        return list(examples)
    return [examples[i] for i in random.Random(0).sample(range(len(examples)), n)]


def group_subset(examples: list[Example], n: int, seed: int) -> list[Example]:
    """About n examples drawn with `seed`, taking whole groups (a MultiRC question with all its answers), so that
    per-question exact match means what it says; the last group taken may overshoot n. Order is kept."""
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


# ------------------------------------------------------------------------------------------------ batching

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
