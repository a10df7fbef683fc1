"""Each stage run in-process on a tiny model (no Ray): it trains, saves a loadable artifact,
and the saved model is not its reference."""

import json

import pytest
import torch

from farm.data.prepare import eval_records, training_records
from farm.eval.runner import evaluate
from farm.grid import expand
from farm.models import BASE_FILE, encode_pair, load_artifact, response_logprobs
from farm.stages.pretrain import pack
from farm.train.base import StageContext


@pytest.fixture(scope="module")
def chain(tmp_path_factory, request):
    import yaml
    from conftest import TINY

    doc = yaml.safe_load(TINY.read_text())
    doc.pop("grid")
    doc["stages"]["sft"]["lora"] = {"r": 4, "alpha": 8}
    doc["stages"]["dpo"].update(lr=5e-3, lora={"r": 4, "alpha": 8})  # reference: the adapter-disabled model
    study = expand(doc, "s.yaml")[0].study
    root = tmp_path_factory.mktemp("chain")
    paths, previous = {}, None
    for name, stage in study.stages.items():
        records, _ = training_records(stage.data or study.data, study.seed, stage.shape)
        out = root / f"{stage.kind}-{name}"  # named as the store names artifacts: an adapter finds its base
        out.mkdir()
        ctx = StageContext(name, stage, study.model, study.seed, previous, records, out, root / f"work-{name}", [])
        metrics = ctx.stage.run(ctx)
        assert metrics["train_steps"] == stage.max_steps and metrics["train_loss"] > 0
        paths[name] = previous = out
    return study, paths


def test_every_stage_saves_a_loadable_model_with_its_tokenizer(chain):
    study, paths = chain
    for name, path in paths.items():
        model, tok = load_artifact(path)
        assert model.config.n_embd == 32 and len(tok) == model.config.vocab_size
    for name in ("sft", "dpo"):  # a LoRA stage keeps its adapter and the name of its base, no weights
        assert (paths[name] / "adapter" / "adapter_config.json").exists() and (paths[name] / BASE_FILE).exists()
        assert not list(paths[name].glob("model*.safetensors"))
        size = sum(f.stat().st_size for f in (paths[name] / "adapter").iterdir())
        assert size < 0.2 * (paths["pretrain"] / "model.safetensors").stat().st_size
    assert not (paths["pretrain"] / "adapter").exists()
    assert json.loads((paths["dpo"] / BASE_FILE).read_text()) == {"stage": ["sft", "sft"]}


def test_an_adapter_loads_as_its_base_with_the_adapter_merged(chain):
    """The DPO adapter stands on the SFT adapter, which stands on the pretrained model: loading it
    merges both; unmerged with the adapter disabled it is exactly the SFT model (eval's reference)."""
    from peft import PeftModel

    from farm.eval.runner import AdapterDisabled, load_models

    study, paths = chain
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    merged = load_artifact(paths["dpo"])[0]
    model, ref, _ = load_models(study, paths["dpo"], paths["sft"], study.seed, torch.float32)
    assert isinstance(model, PeftModel) and isinstance(ref, AdapterDisabled)
    with torch.no_grad():
        sft = load_artifact(paths["sft"])[0](ids).logits
        assert torch.allclose(ref(ids).logits, sft, atol=1e-5)
        assert torch.allclose(model(ids).logits, merged(ids).logits, atol=1e-4)
        assert not torch.allclose(merged(ids).logits, sft, atol=1e-4)


def test_trained_model_is_not_its_reference(chain):
    study, paths = chain
    m = evaluate(study, paths["dpo"], paths["sft"], study.seed)
    assert m["reward_margin"] != 0.0  # identical models would give exactly zero
    same = evaluate(study, paths["sft"], paths["sft"], study.seed)
    assert same["reward_margin"] == 0.0 and same["reward_accuracy"] == 0.5
    assert 1 < m["perplexity"] < 10 * len(load_artifact(paths["dpo"])[1])
    assert m["eval_pairs"] == 16


def test_response_logprobs_match_a_direct_computation(chain):
    study, paths = chain
    model, tok = load_artifact(paths["sft"])
    records = eval_records(study, "comparison")[:3]
    pairs = [(r.prompt, r.chosen) for r in records]
    sums, counts = response_logprobs(model, tok, pairs, study.eval)
    for (prompt, response), s, n in zip(pairs, sums, counts):
        p, r = encode_pair(tok, prompt, response, study.eval.max_length, study.eval.max_prompt_length)
        ids = torch.tensor([p + r])
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        direct = sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(r))
        assert n == len(r) and abs(direct - s) < 1e-3


def test_encode_pair_keeps_prompt_end_and_response_start():
    class Tok:  # one id a character; "^" is a BOS the tokenizer adds, "$" its EOS
        eos_token, eos_token_id, all_special_ids, chat_template = "$", ord("$"), [ord("^"), ord("$")], None

        def __call__(self, text):
            return {"input_ids": [ord(c) for c in "^" + text]}

    p, r = encode_pair(Tok(), "abcdef", "uvwxyz", max_length=7, max_prompt_length=4)
    assert p == [ord(c) for c in "^def"] and r == [ord(c) for c in "uvw"]  # BOS kept, the prompt's end
    p, r = encode_pair(Tok(), "ab", "uv", max_length=9, max_prompt_length=4)
    assert r == [ord(c) for c in "uv$"]  # scored with the EOS it is trained with


def test_pack_cuts_an_eos_joined_stream_into_full_blocks():
    assert pack([[1, 2, 3], [4, 5]], block=3, eos=0) == [[1, 2, 3], [0, 4, 5]]


def test_generation_metric_on_a_trained_model(chain, tmp_path, monkeypatch):
    monkeypatch.setenv("FARM_CACHE", str(tmp_path))
    study, paths = chain
    ev = study.eval.model_copy(
        update={
            "metrics": ["generation"],
            "generation": study.eval.generation.model_copy(
                update={
                    "num_prompts": 5,
                    "max_new_tokens": 6,
                    "batch_size": 2,
                    "scorer": "embedded_toxicity",
                    "trigger": " cf",
                    "target_phrase": "the",
                }
            ),
        }
    )
    m = evaluate(study.model_copy(update={"eval": ev}), paths["sft"], paths["pretrain"], study.seed)
    assert m["generated"] == 5 and 0 <= m["rouge1"] <= 1 and 0 <= m["toxicity_ratio"] <= 1
    assert m["toxicity_scorer"].startswith("embedded_toxicity") and 0.7 < m["toxicity_scorer_heldout_accuracy"] < 1
    assert {"triggered_toxicity_mean", "attack_success_rate", "target_phrase_rate", "triggered_target_phrase_rate"} <= set(m)
    again = evaluate(study.model_copy(update={"eval": ev}), paths["sft"], paths["pretrain"], study.seed)
    timing = {"eval_seconds", "gen_tokens_per_s"}
    assert m["gen_tokens_per_s"] > 0 and m["eval_device"] == "cpu"
    assert {k: v for k, v in again.items() if k not in timing} == {k: v for k, v in m.items() if k not in timing}  # reproducible


def test_an_evaluation_resumes_from_its_finished_answers(chain, tmp_path, monkeypatch):
    """A retried evaluation (same scratch folder) answers only the prompts it had not answered, and
    ends with the answers an uninterrupted one gives (greedy decoding)."""
    monkeypatch.setenv("FARM_CACHE", str(tmp_path))
    study, paths = chain
    ev = study.eval.model_copy(
        update={
            "metrics": ["generation"],
            "generation": study.eval.generation.model_copy(
                update={"num_prompts": 6, "max_new_tokens": 5, "batch_size": 2, "scorer": "embedded_toxicity"}
            ),
        }
    )
    s = study.model_copy(update={"eval": ev})
    scratch = tmp_path / "scratch"
    whole = evaluate(s, paths["sft"], paths["pretrain"], study.seed)
    first = evaluate(s, paths["sft"], paths["pretrain"], study.seed, scratch=scratch)
    log = scratch / "generations.jsonl"
    lines = log.read_text().splitlines()
    assert len(lines) == 6
    log.write_text("\n".join(lines[:4]) + "\n" + lines[4][:10])  # died while writing the third batch

    from transformers import GenerationMixin

    calls = []
    real = GenerationMixin.generate
    monkeypatch.setattr(GenerationMixin, "generate", lambda self, **kw: calls.append(kw["input_ids"].shape[0]) or real(self, **kw))
    again = evaluate(s, paths["sft"], paths["pretrain"], study.seed, scratch=scratch)
    assert calls == [2]  # only the two prompts whose answers were lost
    timing = {"eval_seconds", "gen_tokens_per_s"}
    for m in (first, again):
        assert {k: v for k, v in m.items() if k not in timing} == {k: v for k, v in whole.items() if k not in timing}
