"""A linear probe: how much of a classification task a frozen model's embeddings hold linearly.

The task is a local JSON-lines file, one example a line: `{"text": ..., "label": ..., "split": "train" | "test"}`
(labels any JSON scalars). Each text is embedded by the frozen model (its base model's last hidden states,
mean-pooled over the text's tokens, [CLS] and [SEP] included, or the [CLS] state alone with `pool="cls"`);
a multinomial logistic regression is fitted on the train split's embeddings (standardized with the train
split's mean and spread, L2 penalty, full-batch L-BFGS from a seeded start) and its accuracy on the test split
is the metric. The same model, file and seed give the same number.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


class ProbeError(ValueError):
    """A probe file that cannot be used (one line, naming the file and line)."""


def read_probe(path: str | Path) -> dict[str, tuple[list[str], list]]:
    """split -> (texts, labels) of a probe file; checks every line first."""
    path = Path(path)
    if not path.is_file():
        raise ProbeError(f"--probe {path}: no such file")
    splits: dict[str, tuple[list[str], list]] = {"train": ([], []), "test": ([], [])}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text, label, split = row["text"], row["label"], row["split"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ProbeError(f"{path}:{n}: not a JSON object with text, label and split ({type(e).__name__}: {e})") from None
        if split not in splits or not isinstance(text, str):
            raise ProbeError(f"{path}:{n}: split must be train or test and text a string (got split {split!r})")
        splits[split][0].append(text)
        splits[split][1].append(label)
    for split, (texts, labels) in splits.items():
        if not texts:
            raise ProbeError(f"{path}: no {split} examples")
    if len(set(map(json.dumps, splits["train"][1]))) < 2:
        raise ProbeError(f"{path}: the train split has fewer than two labels")
    return splits


@torch.no_grad()
def embed(model, tokenizer, texts: list[str], pool: str = "mean", batch_size: int = 32, max_len: int = 512) -> torch.Tensor:
    """[len(texts), hidden] float64 embeddings from the frozen `model` (eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_len,
                        return_tensors="pt").to(device)
        hidden = model.base_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state.double()
        if pool == "cls":
            out.append(hidden[:, 0])
        else:
            mask = enc["attention_mask"].unsqueeze(-1).double()
            out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(out).cpu()


def fit_predict(train_x: torch.Tensor, train_y: list, test_x: torch.Tensor, seed: int = 0, l2: float = 1e-3,
                steps: int = 200) -> list:
    """The test split's predicted labels from a logistic regression fitted on the train split."""
    classes = sorted(set(map(json.dumps, train_y)))
    y = torch.tensor([classes.index(json.dumps(v)) for v in train_y])
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-8)
    xs, xt = (train_x - mean) / std, (test_x - mean) / std
    g = torch.Generator().manual_seed(seed)
    w = (0.01 * torch.randn(xs.shape[1], len(classes), generator=g, dtype=torch.float64)).requires_grad_()
    b = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xs @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    pred = (xt @ w + b).argmax(-1).tolist()
    return [json.loads(classes[i]) for i in pred]


def probe(model, tokenizer, path: str | Path, seed: int = 0, pool: str = "mean") -> dict[str, float]:
    """{"accuracy": test accuracy, "items": test examples} of a linear probe on `model`'s embeddings."""
    splits = read_probe(path)
    (train_t, train_y), (test_t, test_y) = splits["train"], splits["test"]
    pred = fit_predict(embed(model, tokenizer, train_t, pool), train_y, embed(model, tokenizer, test_t, pool), seed)
    return {"accuracy": sum(p == t for p, t in zip(pred, test_y)) / len(test_y), "items": len(test_y)}
