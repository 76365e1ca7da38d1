"""The evaluation core: held-out rows and masks fixed by (seed, row), sums that add up over processes,
metrics that agree with transformers' own losses, and no trace left on the model or the RNG."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoTokenizer

from ettin_train.checkpoint.hf import to_hf
from ettin_train.eval.data import EvalSettings, HeldOut, HeldOutError, check_disjoint, read_rows
from ettin_train.eval.metrics import evaluate_sums, metrics
from ettin_train.model import EttinModel, ModelConfig
from ettin_train.objectives import SpecialTokens, get_objective

SETTINGS = EvalSettings(batches=3, batch_size=4, seq_len=64, mask_rate=0.3, seed=5)


@pytest.fixture(scope="module")
def tokens(tiny_data):
    return SpecialTokens.from_tokenizer(AutoTokenizer.from_pretrained(str(tiny_data / "tokenizer")))


def tiny_model(causal: bool) -> EttinModel:
    torch.manual_seed(0)
    cfg = ModelConfig(size=None, num_layers=2, hidden_size=64, intermediate_size=96, num_heads=1, vocab_size=512,
                      sliding_window=16, causal=causal, attention_backend="sdpa")
    return EttinModel(cfg)


def rows_of(batches) -> list[tuple[list[int], list[int] | None]]:
    out = []
    for b in batches:
        for i in range(len(b["input_ids"])):
            real = b["attention_mask"][i].bool()
            out.append((b["input_ids"][i][real].tolist(), b["labels"][i][real].tolist() if "labels" in b else None))
    return out


@pytest.mark.parametrize("objective", ["mlm", "clm", "mntp"])
def test_rows_and_masks_are_fixed_and_split_over_ranks_without_change(tiny_data, tokens, objective):
    obj = get_objective(objective)
    folder = str(tiny_data / "heldout_short")
    one = rows_of(HeldOut(folder, obj, tokens, SETTINGS).batches())
    again = rows_of(HeldOut(folder, obj, tokens, SETTINGS).batches())
    assert one == again and len(one) == SETTINGS.batches * SETTINGS.batch_size
    halves = [rows_of(HeldOut(folder, obj, tokens, SETTINGS).batches(rank, 2)) for rank in (0, 1)]
    b = SETTINGS.batch_size // 2  # rank r holds rows [r*B/2, (r+1)*B/2) of each batch
    merged = [row for k in range(SETTINGS.batches) for half in halves for row in half[k * b:(k + 1) * b]]
    assert merged == one
    if objective != "clm":
        assert any(any(x != -100 for x in labels) for _, labels in one)
        other_seed = rows_of(HeldOut(folder, obj, tokens, EvalSettings(**{**vars(SETTINGS), "seed": 6})).batches())
        assert other_seed != one


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_metrics_agree_with_transformers_losses(tiny_data, tokens, objective):
    """transformers' ModernBert classes compute the mean loss of each batch themselves: the oracle."""
    obj = get_objective(objective)
    model = tiny_model(obj.causal).eval()
    hf = to_hf(model, pad_token_id=tokens.pad, bos_token_id=tokens.cls, eos_token_id=tokens.sep, cls_token_id=tokens.cls,
               sep_token_id=tokens.sep, mask_token_id=tokens.mask).eval()
    held = HeldOut(str(tiny_data / "heldout_short"), obj, tokens, SETTINGS)
    result = metrics(objective, evaluate_sums(model, obj, held.batches()))
    loss_sum = scored = correct = 0.0
    with torch.no_grad():
        for b in held.batches():
            if obj.causal:
                labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
                out = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels)
                logits, targets = out.logits[:, :-1], labels[:, 1:]
            else:
                out = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
                logits, targets = out.logits, b["labels"]
            keep = targets != -100
            n = int(keep.sum())
            loss_sum += float(out.loss) * n
            scored += n
            correct += int((logits[keep].argmax(-1) == targets[keep]).sum())
    assert result["scored_tokens"] == scored
    assert result["loss"] == pytest.approx(loss_sum / scored, rel=1e-5)
    assert result["accuracy"] == pytest.approx(correct / scored, abs=1.0 / scored)  # at most one near-tie flips
    if obj.causal:
        assert result["perplexity"] == pytest.approx(torch.tensor(loss_sum / scored).exp().item(), rel=1e-5)
    else:
        assert "perplexity" not in result


def test_sums_of_two_halves_are_the_sums_of_the_whole(tiny_data, tokens):
    obj = get_objective("mlm")
    model = tiny_model(False)
    held = HeldOut(str(tiny_data / "heldout_short"), obj, tokens, SETTINGS)
    whole = evaluate_sums(model, obj, held.batches())
    halves = sum(evaluate_sums(model, obj, held.batches(rank, 2)) for rank in (0, 1))
    assert whole[1:].tolist() == halves[1:].tolist()  # counts: exact
    assert float(halves[0]) == pytest.approx(float(whole[0]), rel=1e-6)


def test_evaluation_leaves_training_mode_weights_and_rng_untouched(tiny_data, tokens):
    obj = get_objective("mlm")
    model = tiny_model(False).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    evaluate_sums(model, obj, HeldOut(str(tiny_data / "heldout_short"), obj, tokens, SETTINGS).batches())
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # and in eval mode dropout is off: two evaluations give the same sums
    held = HeldOut(str(tiny_data / "heldout_short"), obj, tokens, SETTINGS)
    assert torch.equal(evaluate_sums(model, obj, held.batches()), evaluate_sums(model, obj, held.batches()))


def test_heldout_data_that_is_training_data_is_refused(tiny_data, tmp_path):
    train = str(tiny_data / "short")
    check_disjoint([str(tiny_data / "heldout_short")], [train, str(tiny_data / "long")])
    with pytest.raises(HeldOutError, match="is the training source"):
        check_disjoint([train], [train])
    copy = tmp_path / "copy"
    shutil.copytree(train, copy)
    with pytest.raises(HeldOutError, match="is a copy of the training source"):
        check_disjoint([str(copy)], [train])
    with pytest.raises(HeldOutError, match="overlaps the training source"):
        check_disjoint([train], [str(tiny_data)])


def test_too_few_heldout_samples_is_one_clear_error(tiny_data):
    with pytest.raises(HeldOutError, match="holds 248 samples; 100 batches of 4 need 400"):
        read_rows(str(tiny_data / "heldout_short"), EvalSettings(batches=100, batch_size=4))
