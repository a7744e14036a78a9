"""The text suite on a tiny generated BERT and a tiny word-level tokenizer (nothing from a hub, no
full fine-tuning): zero-shot heads against a hand oracle and independent of every label, packed token
batches against the tokenizer's own padding, the bank made by the suite, and `--suite text` reaching
the bank and the demo through the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from hf_tiny import bert  # noqa: E402

from taskvec.cli import main  # noqa: E402
from taskvec.data.text import GENERIC_TEMPLATE, TextSet, TextTask  # noqa: E402
from taskvec.models.hf import load_zero_shot_head  # noqa: E402
from taskvec.suites import Suite  # noqa: E402
from taskvec.suites import text as text_suite  # noqa: E402
from taskvec.suites.text import TextBankConfig, TextSuite, pack  # noqa: E402

CLASSES = {
    "alpha": ["sport", "film", "market"],
    "beta": ["cat", "dog"],
    "gamma": ["red", "blue", "green"],
}
TEMPLATE = "news about {}"
FILLER = ["the", "a", "big", "small", "old", "new", "today", "news", "about"]
WORDS = sorted({w for names in CLASSES.values() for w in names} | set(FILLER))
TINY = TextBankConfig(min_steps=2, batch_size=4, lr=1e-3, val_cap=6)


def _texts(classes: list[str], per_class: int, seed: int) -> TextSet:
    rng = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for label, name in enumerate(classes):
        for _ in range(per_class):
            words = [FILLER[int(i)] for i in torch.randint(len(FILLER), (3,), generator=rng)]
            words.insert(int(torch.randint(4, (1,), generator=rng)), name)
            texts.append(" ".join(words))
            labels.append(label)
    return TextSet(texts, torch.tensor(labels))


def fake_task(name: str, seed: int = 0) -> TextTask:
    classes = CLASSES[name]
    return TextTask(name, classes, TEMPLATE, _texts(classes, 6, seed + 1), _texts(classes, 3, seed + 2),
                    _texts(classes, 4, seed + 3))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model directory, tokenizer): a 2-layer BERT whose vocabulary is the fixture's words."""
    root = tmp_path_factory.mktemp("tinytext")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    try:  # transformers 5 takes the vocabulary as `vocab`, 4.x as `vocab_file`
        tok = transformers.BertTokenizerFast(vocab=str(vocab))
    except TypeError:
        tok = transformers.BertTokenizerFast(vocab_file=str(vocab))
    if tok.convert_tokens_to_ids("cat") == tok.unk_token_id:
        tok = transformers.BertTokenizerFast(vocab_file=str(vocab))
    model_dir = root / "bert"
    bert(seed=0, vocab_size=5 + len(WORDS)).save_pretrained(model_dir)
    return model_dir, tok


def make_suite(tiny, root, tasks=("alpha", "beta", "gamma"), task_loader=fake_task, config=TINY, **_) -> TextSuite:
    model_dir, tok = tiny
    return TextSuite(config=config, root=root, tasks=tasks, model_path=model_dir, tokenizer=tok,
                     task_loader=task_loader, progress=False, eval_batch_size=5)


def _oracle_embeddings(model_dir, tok, texts: list[str]) -> torch.Tensor:
    """Masked mean of BertModel's last hidden states, L2-normalised: sentence-transformers' pooling."""
    model = transformers.AutoModel.from_pretrained(str(model_dir)).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_the_text_suite_is_a_suite(tiny, tmp_path):
    assert isinstance(make_suite(tiny, tmp_path), Suite)


def test_zero_shot_head_is_the_prompt_oracle_and_never_reads_a_label(tiny, tmp_path):
    model_dir, tok = tiny
    suite = make_suite(tiny, tmp_path)
    task = fake_task("alpha")
    head = suite.zero_shot_head(task, suite.backbone())

    rows = []
    for name in task.classes:
        per_template = _oracle_embeddings(model_dir, tok, [TEMPLATE.format(name), GENERIC_TEMPLATE.format(name)])
        rows.append(F.normalize(per_template.mean(0), dim=0))
    torch.testing.assert_close(head.weight, torch.stack(rows), atol=1e-5, rtol=1e-5)

    # Labels shuffled in every split, and texts replaced altogether: the same head, bit for bit.
    perm = torch.Generator().manual_seed(3)
    shuffled = fake_task("alpha")
    for split in (shuffled.train, shuffled.val, shuffled.test):
        split.labels = split.labels[torch.randperm(len(split), generator=perm)]
    other_texts = fake_task("alpha", seed=50)
    for variant in (shuffled, other_texts):
        assert torch.equal(suite.zero_shot_head(variant, suite.backbone()).weight, head.weight)


def test_packed_batches_equal_the_tokenizers_own_padding(tiny, tmp_path):
    _, tok = tiny
    suite = make_suite(tiny, tmp_path)
    split = fake_task("alpha").train
    unique = TextSet(split.texts, torch.arange(len(split)))  # a label names its text
    loader = suite.loader(unique, batch_size=4, min_steps=7)
    batches = list(loader.epoch(torch.Generator().manual_seed(0)))
    assert len(batches) == len(loader) == 7  # 18 texts in 5 batches, repeated to 7
    for x, y in batches:
        ref = tok([split.texts[i] for i in y.tolist()], padding=True, return_tensors="pt")
        assert torch.equal(x, pack(ref["input_ids"], ref["attention_mask"]))
    seen = torch.cat([y for _, y in batches[:5]])
    assert set(seen.tolist()) == set(range(18))  # the first pass walks every text

    weak = suite.loader(unique, batch_size=4, augmentation="weak")
    one = [x for x, _ in weak.epoch(torch.Generator().manual_seed(1))]
    two = [x for x, _ in weak.epoch(torch.Generator().manual_seed(1))]
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))  # seeded views
    with pytest.raises(ValueError, match="unknown text augmentation"):
        suite.loader(unique, batch_size=4, augmentation="span")


def test_packed_input_equals_the_unpacked_call(tiny, tmp_path):
    suite = make_suite(tiny, tmp_path)
    model = suite.backbone()
    enc = tiny[1](["the cat", "a big red dog today"], padding=True, return_tensors="pt")
    packed = model(pack(enc["input_ids"], enc["attention_mask"]))
    torch.testing.assert_close(packed, model(enc["input_ids"], enc["attention_mask"]))
    torch.testing.assert_close(packed, _oracle_embeddings(tiny[0], tiny[1], ["the cat", "a big red dog today"]),
                               atol=1e-5, rtol=1e-5)


def test_the_bank_builds_text_entries_through_the_zero_shot_head(tiny, tmp_path):
    suite = make_suite(tiny, tmp_path / "bank", tasks=("alpha", "beta"))
    metas = suite.bank.build(["alpha", "beta"], progress=False)
    for meta in metas:
        assert meta["steps"] == TINY.min_steps and meta["examples"] == TINY.min_steps * TINY.batch_size
        assert {"head_test_bal", "finetuned_test_bal"} <= set(meta)
        _, classes, templates = load_zero_shot_head(suite.bank.entry(meta["task"]) / "head.safetensors")
        assert classes == CLASSES[meta["task"]] and templates == [TEMPLATE, GENERIC_TEMPLATE]
    # The vector is the pure parameter difference: base + vector scores what the fine-tuned model scored.
    base = suite.backbone()
    tuned = suite.vectors(["alpha"])[0].apply_to(base, 1.0)
    head = suite.head("alpha")
    task = fake_task("alpha")
    assert suite.accuracy(tuned, head, task.test) == pytest.approx(metas[0]["finetuned_test_acc"])
    assert suite.vectors(["alpha"])[0].norm() > 0
    stamp = (suite.bank.entry("alpha") / "meta.json").stat().st_mtime_ns
    suite.bank.build(["alpha"], progress=False)  # cached: nothing is rebuilt
    assert (suite.bank.entry("alpha") / "meta.json").stat().st_mtime_ns == stamp


def test_suite_flag_reaches_bank_and_demo_through_the_cli(tiny, tmp_path, monkeypatch, capsys):
    made = []

    def factory(**kwargs):
        kwargs.setdefault("root", tmp_path / "demo-bank")
        kwargs["config"] = dataclasses.replace(TINY, seed=kwargs.get("config", TINY).seed)
        suite = make_suite(tiny, **kwargs)
        made.append(suite)
        return suite

    monkeypatch.setattr(text_suite, "TextSuite", factory)
    # The fake tasks stand in for the registered text tasks that the CLI checks names against.
    from taskvec import validate

    monkeypatch.setattr(validate, "_tasks", lambda suite="vision": ["alpha", "beta", "gamma"])
    root = tmp_path / "cli-bank"
    assert main(["bank", "build", "--suite", "text", "--root", str(root), "--tasks", "alpha", "beta"]) == 0
    capsys.readouterr()
    assert main(["bank", "list", "--suite", "text", "--root", str(root), "--tasks", "alpha", "beta", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["task"] for r in rows] == ["alpha", "beta"]
    assert all({"head_test_acc", "finetuned_test_acc", "head_test_bal"} <= set(r) for r in rows)

    out = tmp_path / "demo"
    assert main(["demo", "--suite", "text", "--target", "gamma", "--shots", "3", "--epochs", "1",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for row in ("zero-shot", "task arithmetic", "learned isotropic", "aTLAS (block)"):
        assert row in printed
    result = json.loads((out / "demo.json").read_text())
    assert result["config"]["suite"]["suite"] == "text" and result["bank"]["sources"] == ["alpha", "beta"]
    assert (out / "demo_coefficients.png").is_file()
    assert made[-1].bank.has("alpha") and not made[-1].bank.has("gamma")  # the target stays out of the bank


def test_addition_recipe_runs_on_the_text_suite(tiny, tmp_path, monkeypatch):
    from taskvec.merging import task_arithmetic
    from taskvec.recipes.addition import AdditionConfig, run_addition

    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))
    suite = make_suite(tiny, tmp_path / "bank", tasks=("alpha", "beta"))
    config = AdditionConfig(methods=("pretrained", "task_arithmetic", "ties", "adamerging", "atlas", "atlas_lin"),
                            select_per_task=2, fit_per_task=3, epochs=1, adamerging_steps=2, batch_per_task=2,
                            out=tmp_path / "addition", progress=False)
    result = run_addition(config, suite=suite)
    rows = {row["key"]: row for row in result["rows"]}
    assert set(rows) == set(config.methods)
    for task in ("alpha", "beta"):  # the pre-trained row is the bank's zero-shot accuracy
        assert rows["pretrained"]["test_acc"][task] == pytest.approx(suite.bank.meta(task)["head_test_acc"])
    # Task arithmetic's test row, recomputed by hand: base + alpha * (tau_alpha + tau_beta), each zero-shot head.
    alpha = rows["task_arithmetic"]["alpha"]
    merged = task_arithmetic(suite.vectors(["alpha", "beta"]), 1.0).apply_to(suite.backbone(), alpha)
    for task in ("alpha", "beta"):
        expected = suite.accuracy(merged, suite.head(task), fake_task(task).test)
        assert rows["task_arithmetic"]["test_acc"][task] == pytest.approx(expected)
    assert suite.linearized().bank.has("alpha")  # the linearised text bank was built beside the standard one


def test_negation_recipe_runs_on_the_text_suite(tiny, tmp_path, monkeypatch):
    from taskvec.recipes.negation import NegationConfig, run_negation

    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))
    suite = make_suite(tiny, tmp_path / "bank", tasks=("alpha", "beta"))
    config = NegationConfig(targets=("alpha",), control="beta", fallback_control="alpha",
                            methods=("pretrained", "task_arithmetic", "atlas"), select_per_task=2, fit_per_task=3,
                            epochs=1, batch_size=2, out=tmp_path / "negation", progress=False)
    result = run_negation(config, suite=suite)
    rows = {row["key"]: row for row in result["rows"]}
    assert set(rows) == {"pretrained", "task_arithmetic", "atlas"}
    assert rows["pretrained"]["target_test"] == pytest.approx(suite.bank.meta("alpha")["head_test_acc"])
    alpha = rows["task_arithmetic"]["alpha"]
    negated = suite.vectors(["alpha"])[0].apply_to(suite.backbone(), alpha)
    expected = suite.accuracy(negated, suite.head("beta"), fake_task("beta").test)  # independent recomputation
    assert rows["task_arithmetic"]["control_test"] == pytest.approx(expected)
    assert suite.bank.loader("alpha", seed=0).classes == CLASSES["alpha"]  # the bank reads the suite's tasks


def test_text_demo_arguments_checked_against_the_text_tasks(tmp_path, capsys):
    from taskvec import cli
    from taskvec.validate import demo_out

    assert main(["demo", "--suite", "text", "--target", "wordnet_nown", "--out", str(tmp_path / "o")]) == 2
    assert "--target 'wordnet_nown' is not one of" in capsys.readouterr().err
    assert main(["demo", "--suite", "text", "--target", "emoji_twitter", "--out", str(tmp_path / "o")]) == 2
    args = cli.build_parser().parse_args(["demo", "--suite", "text"])
    assert demo_out(args) == Path("runs/demo-text")


def test_bank_built_by_two_worker_processes_equals_the_sequential_build(tiny, tmp_path):
    """Workers only change where entries are made: same vectors, heads and scores as one process."""
    one = make_suite(tiny, tmp_path / "one", tasks=("alpha", "beta"))
    two = make_suite(tiny, tmp_path / "two", tasks=("alpha", "beta"))
    assert two.worker_factory() is not None
    one.build(workers=1)
    two.build(workers=2)
    for task in ("alpha", "beta"):
        a, b = one.bank.vector(task), two.bank.vector(task)
        assert a.names == b.names
        for key in a.names:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
        meta_one, meta_two = one.bank.meta(task), two.bank.meta(task)
        for key in ("head_test_acc", "finetuned_val_acc", "finetuned_test_acc", "steps"):
            assert meta_one[key] == meta_two[key]
    assert two.bank.has("alpha") and two.bank.has("beta")


def test_parallel_build_refuses_what_cannot_reach_a_worker(tiny, tmp_path):
    suite = make_suite(tiny, tmp_path / "bank", tasks=("alpha", "beta"), task_loader=lambda name, seed=0: None)
    assert suite.worker_factory() is None
    with pytest.raises(ValueError, match="worker process"):
        suite.build(workers=2)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        suite.bank.build(["alpha"], workers=0)


def test_prepare_ranks_entries_by_padded_tokens(tiny, tmp_path):
    """The parallel build starts the costliest entry first; longer texts must cost more."""
    def padded_task(name: str, seed: int = 0) -> TextTask:
        task = fake_task("alpha", seed)
        if name == "beta":  # the same task with every text three times as long
            grow = lambda split: TextSet([" ".join([t] * 3) for t in split.texts], split.labels)  # noqa: E731
            return TextTask("beta", task.classes, TEMPLATE, grow(task.train), grow(task.val), grow(task.test))
        return task

    suite = make_suite(tiny, tmp_path / "bank", tasks=("alpha", "beta"), task_loader=padded_task)
    assert suite.prepare("beta") > 2 * suite.prepare("alpha") > 0
