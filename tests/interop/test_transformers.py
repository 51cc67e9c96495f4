"""nblosses.torch.transformers on tiny random models built here (no downloads, no hub): the
patched loss and every parameter gradient equal the unpatched model's (Llama, Qwen2, Qwen3,
Gemma 2 and 3 with softcapping, GPT-2 with tied weights, Mistral, Phi with a head bias, Cohere
and Granite with scaled logits), with logits_to_keep, shift_labels, ignore_index,
num_items_in_batch and return_dict=False; one transformers.Trainer step with gradient
accumulation; the logits are never formed (None in the output) unless asked for; models it
cannot reproduce raise.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from nblosses.torch.transformers import patch, unpatch  # noqa: E402

V = 97
_COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)

# name -> the model, built from a tiny config. initializer_range=0.2 makes logits of order 1,
# so that the softcaps (smaller than the logits) and scalings change the loss.
MODELS: dict[str, Callable[[], Any]] = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**_COMMON)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_COMMON)),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(**_COMMON, head_dim=8)),
    "gemma2": lambda: transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(**_COMMON, head_dim=8, final_logit_softcapping=1.5)),
    "gemma3": lambda: transformers.Gemma3ForCausalLM(
        transformers.Gemma3TextConfig(**_COMMON, head_dim=8, final_logit_softcapping=1.5)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**_COMMON)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2,
        bos_token_id=0, eos_token_id=0)),
    "phi": lambda: transformers.PhiForCausalLM(transformers.PhiConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, initializer_range=0.2)),
    "cohere": lambda: transformers.CohereForCausalLM(
        transformers.CohereConfig(**_COMMON, logit_scale=0.5)),
    "granite": lambda: transformers.GraniteForCausalLM(
        transformers.GraniteConfig(**_COMMON, logits_scaling=3.0)),
}


def _model(name: str) -> Any:
    torch.manual_seed(0)
    model = MODELS[name]()
    model.eval()  # no dropout: the two runs compare the same function
    return model


def _batch(seed: int = 1, shape: tuple[int, int] = (3, 11)) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, shape, generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[2, -3:] = -100
    return ids, labels


def _loss_and_grads(model: Any, **inputs: Any) -> tuple[Any, Any, dict[str, Any]]:
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, out.loss.detach(), grads


def _assert_same(model: Any, patched_kw: dict[str, Any] | None = None, **inputs: Any) -> Any:
    """The unpatched then the patched model on ``inputs``: equal losses and gradients (every
    parameter that gets one); returns the patched output."""
    _, want, want_grads = _loss_and_grads(model, **inputs)
    patch(model, **(patched_kw or {}))
    try:
        out, got, grads = _loss_and_grads(model, **inputs)
    finally:
        unpatch(model)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    assert grads.keys() == want_grads.keys() and grads
    for name, grad in grads.items():
        scale = want_grads[name].abs().max().item()
        torch.testing.assert_close(grad, want_grads[name], rtol=0, atol=2e-5 * max(scale, 1e-3),
                                   msg=lambda m, name=name: f"{name}: {m}")
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_loss_and_every_gradient_equal_the_unpatched_model(name: str) -> None:
    model = _model(name)
    ids, labels = _batch()
    out = _assert_same(model, input_ids=ids, labels=labels)
    assert out.logits is None


def test_the_listed_features_are_exercised() -> None:
    """The parity above covers what it claims: a head bias, and softcaps and scalings that
    change the loss (tied weights: the next test)."""
    assert _model("phi").lm_head.bias is not None
    ids, labels = _batch()
    for name, attribute, plain in (("gemma2", "final_logit_softcapping", None),
                                   ("cohere", "logit_scale", 1.0),
                                   ("granite", "logits_scaling", 1.0)):
        model = _model(name)
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss
            setattr(model.config, attribute, plain)
            if name == "cohere":
                model.logit_scale = plain
            unchanged = model(input_ids=ids, labels=labels).loss
        assert abs(loss - unchanged) > 1e-3, name


def test_gradients_reach_tied_weights_once() -> None:
    model = _model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    ids, labels = _batch()
    _assert_same(model, input_ids=ids, labels=labels)


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_loss_keywords(name: str) -> None:
    """``num_items_in_batch`` (the gradient-accumulation normaliser), ``shift_labels``,
    ``ignore_index``, ``logits_to_keep`` with labels for the kept positions."""
    model = _model(name)
    ids, labels = _batch()
    _assert_same(model, input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(13))
    shifted = torch.roll(labels, -2, dims=1)
    _assert_same(model, input_ids=ids, labels=labels, shift_labels=shifted)
    _assert_same(model, input_ids=ids, labels=labels.clamp(min=5), ignore_index=5)
    _assert_same(model, input_ids=ids, labels=labels[:, -6:], logits_to_keep=6)


def test_keep_logits_and_tuples() -> None:
    model = _model("gemma2")
    ids, labels = _batch()
    with torch.no_grad():
        want = model(input_ids=ids, labels=labels)
        patch(model, keep_logits=True)
        got = model(input_ids=ids, labels=labels)
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
        patch(model)  # again: the option is replaced
        loss, *rest = model(input_ids=ids, labels=labels, return_dict=False)
        torch.testing.assert_close(loss, want.loss)
        assert not any(isinstance(r, torch.Tensor) and r.shape[-1:] == (V,) for r in rest)
        generation = model(input_ids=ids)  # no labels: logits, as before
        torch.testing.assert_close(generation.logits, want.logits)
        assert generation.loss is None


def test_block_memory_sets_whole_vocabulary_row_blocks(monkeypatch: Any) -> None:
    """``block_memory`` bytes of float32 logits per block of whole-vocabulary rows reach the
    loss as torch's ``batch_chunk_size``; below 128 rows, or with None, the default plan; the
    loss and gradients are the same either way."""
    import nblosses.torch.transformers as T

    assert T._row_blocks(32 << 20, 32000).batch_chunk_size == 262
    assert T._row_blocks(32 << 20, 128256) is None  # 65 rows: the default (split) plan
    assert T._row_blocks(None, 32000) is None
    seen = []
    real = T.linear_cross_entropy
    monkeypatch.setattr(T, "linear_cross_entropy",
                        lambda *a, options=None, **kw: seen.append(options) or real(
                            *a, options=options, **kw))
    ids, labels = _batch()
    _assert_same(_model("llama"), input_ids=ids, labels=labels)
    _assert_same(_model("llama"), {"block_memory": None}, input_ids=ids, labels=labels)
    assert seen[0].batch_chunk_size == (32 << 20) // (4 * V) and seen[1] is None
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="block_memory"):
            patch(_model("llama"), block_memory=bad)


def test_unpatch_restores_and_copies_stay_patched() -> None:
    model = _model("llama")
    ids, labels = _batch()
    patch(model)
    twin = copy.deepcopy(model)
    assert twin.forward.__self__ is twin
    assert twin(input_ids=ids, labels=labels).logits is None
    assert "forward" not in unpatch(model).__dict__
    assert model(input_ids=ids, labels=labels).logits is not None
    assert unpatch(model) is model  # nothing to undo


def test_refuses_what_it_cannot_reproduce() -> None:
    ids, labels = _batch()
    moe = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **_COMMON, num_local_experts=2, output_router_logits=True))
    patch(moe)
    with pytest.raises(NotImplementedError, match="auxiliary loss"):
        moe(input_ids=ids, labels=labels)

    model = patch(_model("llama"))
    hook = model.lm_head.register_forward_hook(lambda module, args, out: out + 1.0)
    with pytest.raises(NotImplementedError, match="add"):
        model(input_ids=ids, labels=labels)
    hook.remove()

    model = _model("llama")
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(NotImplementedError, match="Sequential"):
        patch(model)

    model = _model("llama")
    model.loss_function = lambda logits, labels, vocab_size, **kw: logits.sum()
    with pytest.raises(NotImplementedError, match="causal-LM loss"):
        patch(model)


def test_trainer_step_with_gradient_accumulation(tmp_path: Any) -> None:
    """One optimiser step over 2 accumulated batches of uneven label counts (the Trainer then
    passes ``num_items_in_batch``): the same logged loss and the same parameters after it."""
    data = []
    ids, labels = _batch(seed=10, shape=(4, 12))
    for i in range(4):
        labels[i, :3 * i] = -100
        data.append({"input_ids": ids[i], "labels": labels[i]})

    def step(patched: bool) -> tuple[float, dict[str, Any]]:
        model = _model("llama")
        model.train()
        if patched:
            patch(model)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(patched)), per_device_train_batch_size=2,
            gradient_accumulation_steps=2, max_steps=1, optim="sgd", learning_rate=0.5,
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
            dataloader_num_workers=0, disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        loss = next(log["loss"] for log in trainer.state.log_history if "loss" in log)
        return loss, {n: p.detach().clone() for n, p in model.named_parameters()}

    want_loss, want = step(False)
    got_loss, got = step(True)
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    for name, value in got.items():
        torch.testing.assert_close(value, want[name], rtol=1e-5, atol=1e-6, msg=name)
    initial = _model("llama").state_dict()
    assert not torch.equal(got["lm_head.weight"], initial["lm_head.weight"])  # it did step


def test_importing_nblosses_torch_does_not_import_transformers() -> None:
    code = ("import sys, nblosses, nblosses.torch; "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
