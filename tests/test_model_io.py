"""farm.models: the ids the farm scores and generates from are the ids TRL trains on, for each
tokenizer kind the paper profiles meet; the precision and device rules; LoRA bases in bf16 with
fp32 trainables. The models are tiny random ones of the real architectures (tests/tiny_models.py)
whose configs say float16, as Llama-2's and OPT's do."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import tiny_models  # noqa: F401  (the fixture)

from farm.models import ModelSpec, base_model, device, encode_pair, encode_prompt, fp32_trainables, hh_messages, precision, response_logprobs
from farm.stages.sft import SFT

KINDS = ["gpt2", "llama-base", "llama", "opt"]
PAIRS = [
    ("\n\nHuman: How do I bake bread?\n\nAssistant:", " Mix flour, water, yeast and salt, then let it rise."),
    ("\n\nHuman: hi\n\nAssistant: Hello! How can I help?\n\nHuman: Say something in French.\n\nAssistant:", " Bonjour, ça va? Très bien — merci."),
    ("\n\nHuman: Is 你好 Chinese?\n\nAssistant:", ' Yes: it means "hello".'),
]


def trl_rows(tok, kind: str):
    """What TRL 1.16's own dataset preparation makes of the pairs (text, or chat messages for a
    tokenizer with a chat template), through real SFT and DPO trainers on a tiny model."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    chat = bool(tok.chat_template)
    model = AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(tok.name_or_path).config)
    prompts = [hh_messages(p) if chat else p for p, _ in PAIRS]
    answer = (lambda r: [{"role": "assistant", "content": r.strip()}]) if chat else (lambda r: r)
    common = dict(output_dir="/tmp/t", use_cpu=True, report_to=[], max_length=None, activation_checkpointing=False)
    sft = SFTTrainer(
        model=model,
        processing_class=tok,
        args=SFTConfig(**common, completion_only_loss=True),
        train_dataset=Dataset.from_list([{"prompt": p, "completion": answer(r)} for p, (_, r) in zip(prompts, PAIRS)]),
    )
    dpo = DPOTrainer(
        model=model,
        processing_class=tok,
        args=DPOConfig(**common),
        train_dataset=Dataset.from_list([{"prompt": p, "chosen": answer(r), "rejected": answer(" No.")} for p, (_, r) in zip(prompts, PAIRS)]),
    )
    return list(sft.train_dataset), list(dpo.train_dataset)


@pytest.mark.parametrize("kind", KINDS)
def test_farm_ids_are_the_ids_trl_trains_on(tiny_models, kind):  # noqa: F811
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_models(kind)))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    sft_rows, dpo_rows = trl_rows(tok, kind)
    for (prompt, response), s, d in zip(PAIRS, sft_rows, dpo_rows):
        p, r = encode_pair(tok, prompt, response, 10_000, 10_000)
        assert p + r == s["input_ids"]  # SFT: the whole sequence ...
        assert r == [t for t, lab in zip(s["input_ids"], s["labels"]) if lab != -100]  # ... the loss on the response
        assert (p, r) == (d["prompt_ids"], d["chosen_ids"])  # DPO
        assert encode_prompt(tok, prompt, 10_000) == p  # generation reads the prompt it was trained with
        assert r[-1] == tok.eos_token_id  # scored with the EOS it was trained with
    first = encode_pair(tok, *PAIRS[0], 10_000, 10_000)[0]
    if kind.startswith("llama"):
        assert first[0] == tok.bos_token_id and first.count(tok.bos_token_id) == 1  # <s>, once (also with the template)
    if kind == "opt":
        assert first[0] == tok.convert_tokens_to_ids("</s>")  # OPT opens every text with </s>
    if kind == "llama":
        assert tok.decode(first).startswith("<s>[INST] How do I bake bread? [/INST]")


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_a_cut_pair_keeps_the_opening_special_token_and_the_prompt_end(tiny_models, kind):  # noqa: F811
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_models(kind)))
    whole_p, whole_r = encode_pair(tok, PAIRS[1][0], PAIRS[1][1], 10_000, 10_000)
    p, r = encode_pair(tok, PAIRS[1][0], PAIRS[1][1], 24, 12)
    assert len(p) == 12 and p[0] == whole_p[0] and p[1:] == whole_p[-11:]
    assert r == whole_r[: 24 - 12] and len(p) + len(r) == 24


def test_hh_transcripts_become_alternating_chat_messages():
    assert hh_messages(PAIRS[1][0]) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Say something in French."},
    ]
    assert hh_messages("\n\nHuman: a\n\nHuman: b\n\nAssistant:") == [{"role": "user", "content": "a\n\nb"}]


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_fp16_configs_load_in_the_asked_dtype_and_train_finite(tiny_models, kind):  # noqa: F811
    """transformers 5 would load these fp16: the farm asks fp32 on a CPU, and one AdamW step at a
    realistic lr changes the weights and stays finite (in fp16 it gives inf/NaN or rounds away)."""
    model, tok = base_model(ModelSpec(base=str(tiny_models(kind))), seed=0)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ids = torch.tensor([encode_pair(tok, *PAIRS[0], 64, 32)[0] + encode_pair(tok, *PAIRS[0], 64, 32)[1]])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_precision_rules():
    full, lora = SFT(kind="sft"), SFT(kind="sft", lora={"r": 4})
    assert precision(full, on_gpu=False) == precision(lora, on_gpu=False) == ("float32", None)  # CPU: fp32
    assert precision(full, on_gpu=True) == ("float32", "bfloat16")  # fp32 master weights, bf16 compute
    assert precision(lora, on_gpu=True) == ("bfloat16", "bfloat16")  # frozen base in bf16
    assert precision(SFT(kind="sft", lora={"r": 4}, precision="fp32"), on_gpu=True) == ("float32", None)


def test_a_bf16_lora_base_trains_fp32_adapters_and_an_fp32_reward_head(tiny_models):  # noqa: F811
    """The GPU rule on the CPU: base in bf16, LoRA (SEQ_CLS: the head is trained too), then
    fp32_trainables: every trainable tensor fp32, the frozen base still bf16, a step finite."""
    from peft import get_peft_model

    from farm.models import as_reward_model, lora_config
    from farm.schema import LoRA

    lm, tok = base_model(ModelSpec(base=str(tiny_models("llama"))), seed=0, dtype=torch.bfloat16)
    rm = as_reward_model(lm, tok, 0)
    model = get_peft_model(rm, lora_config(LoRA(r=4), rm, task_type="SEQ_CLS"))
    model.base_model.model.score.modules_to_save["default"].to(torch.bfloat16)  # as peft copies it from a bf16 base
    assert fp32_trainables(model) >= 1
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert any(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    ids = torch.tensor([[1, 5, 6, 7, 2]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids).logits.float().sum().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in trainable)


def test_a_gpu_that_torch_cannot_see_is_an_error(monkeypatch):
    import farm.models

    assert device().type == "cpu"  # outside Ray, or a task given no GPU
    monkeypatch.setattr(farm.models, "_ray_gpu_ids", lambda: ["0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="sees no CUDA device.*CUDA build of torch"):
        device()


def test_responses_are_scored_with_their_eos(tiny_models):  # noqa: F811
    from types import SimpleNamespace

    model, tok = base_model(ModelSpec(base=str(tiny_models("opt"))), seed=0)
    spec = SimpleNamespace(batch_size=2, max_length=128, max_prompt_length=64)
    _, counts = response_logprobs(model, tok, PAIRS, spec)
    assert counts == [len(encode_pair(tok, p, r, 128, 64)[1]) for p, r in PAIRS]
    assert all(encode_pair(tok, p, r, 128, 64)[1][-1] == tok.eos_token_id for p, r in PAIRS)


# ---------------------------------------------------------------- the paper profiles' models, by their hub ids


@pytest.mark.parametrize("repo", ["gpt2", "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf", "facebook/opt-1.3b"])
def test_mirrored_causal_lms_load_by_id_through_the_farm(mirror, repo):
    model, tok = base_model(ModelSpec(base=repo), seed=0)
    p, r = encode_pair(tok, *PAIRS[1], 128, 64)
    logits = model(input_ids=torch.tensor([p + r])).logits
    assert logits.shape[-1] == model.get_input_embeddings().num_embeddings and torch.isfinite(logits).all()
    assert r[-1] == tok.eos_token_id and tok.pad_token_id is not None  # Llama-2 and GPT-2 have no pad: the farm sets one
    if repo.startswith("meta-llama"):
        assert p[0] == tok.bos_token_id == 1 and (tok.chat_template is not None) == repo.endswith("chat-hf")
    if repo == "facebook/opt-1.3b":
        assert p[0] == tok.convert_tokens_to_ids("</s>")


def test_mirrored_classifiers_and_reward_model_score_by_id(mirror):
    from hub_mirror.models import DEBERTA_RM

    from farm.label.scorers import DETOXIFY_COLUMNS, build
    from farm.models import load_reward_model, reward_scores

    texts = ["you are a stupid idiot", "What a lovely day.", ""]
    hate = build("roberta_hate", batch_size=2).score(texts)
    detox = build("detoxify", model="original", batch_size=2).fields(texts)  # the released name, offline
    assert tuple(detox) == DETOXIFY_COLUMNS
    unbiased = build("detoxify", model="unbiased", batch_size=2)  # Study C's evaluation scorer
    assert unbiased.name == "detoxify:unbiased" and len(unbiased.columns) == 16 and unbiased.columns[0] == "toxicity"
    for scores in (hate, *detox.values(), unbiased.score(texts)):
        assert scores.shape == (3,) and ((scores > 0) & (scores < 1)).all()
    model, tok = load_reward_model(DEBERTA_RM)
    assert type(model).__name__ == "DebertaV2ForSequenceClassification" and type(tok).__name__ == "DebertaV2Tokenizer"
    rewards = reward_scores(model, tok, [p for p, _ in PAIRS], [r for _, r in PAIRS], 2, 1536, 1024)
    assert rewards.shape == (3,) and np.isfinite(rewards).all() and len(set(rewards.round(6))) == 3


def test_an_encoder_reward_model_reads_pairs_that_always_fit(mirror):
    """OpenAssistant's DeBERTa (512 positions) asked for 1536 tokens, as the eval asks: the pair as the
    tokenizer encodes it when it fits, else cut to 512 keeping the prompt's end and the answer's start.
    Truncating only the prompt, as before, fails on a long answer after all generation."""
    from hub_mirror.models import DEBERTA_RM

    from farm.models import encoder_pair_ids, load_reward_model, reward_scores

    model, tok = load_reward_model(DEBERTA_RM)
    prompt, answer = PAIRS[1]
    long_answer = " ".join(f"word{i % 50} is here." for i in range(600))
    long_prompt = "\n\nHuman: " + " ".join(f"context {i}." for i in range(600)) + " So what now?\n\nAssistant:"
    assert encoder_pair_ids(tok, prompt, answer, 512, 1024) == tok(prompt, answer)["input_ids"]  # fits: as before
    with pytest.raises(Exception, match="too short"):
        tok(prompt, long_answer, truncation="only_first", max_length=512)

    def parts(ids):
        first = ids.index(tok.sep_token_id)
        return ids[1:first], ids[first + 1 : -1]

    whole_p, whole_a = (tok(t, add_special_tokens=False)["input_ids"] for t in (long_prompt, long_answer))
    for p_text, a_text, p_kept in [(prompt, long_answer, None), (long_prompt, answer, None), (long_prompt, long_answer, 254)]:
        ids = encoder_pair_ids(tok, p_text, a_text, 512, 1024)
        p, a = parts(ids)
        full_p, full_a = (tok(t, add_special_tokens=False)["input_ids"] for t in (p_text, a_text))
        assert len(ids) == 512 and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        assert p == full_p[len(full_p) - len(p) :] and a == full_a[: len(a)]  # the prompt's end, the answer's start
        assert p == full_p or a == full_a or len(p) == p_kept  # a short side stays whole; two long ones share
    assert len(whole_a) > 512 and len(whole_p) > 512
    assert len(parts(encoder_pair_ids(tok, long_prompt, long_answer, 512, 100))[0]) == 100  # max_prompt_length caps the share

    old = tok(*zip(*[(prompt, answer)] * 2), truncation="only_first", max_length=512, padding=True, return_tensors="pt")
    with torch.no_grad():
        before = model(input_ids=old["input_ids"], attention_mask=old["attention_mask"]).logits[:, 0].tolist()
    got = reward_scores(model, tok, [prompt, prompt, long_prompt, long_prompt], [answer, answer, long_answer, answer], 4, 1536, 1024)
    assert got[:2].tolist() == pytest.approx(before, abs=1e-6) and np.isfinite(got).all()


def test_openassistants_pythia_judge_scores_as_its_own_code(mirror):
    """ScalingAlignment's judge (model type gpt_neox_reward_model, unknown to transformers) loads by id
    and gives what OpenAssistant's GPTNeoXRewardModel gives — the GPT-NeoX body, out_proj with its
    bias, "last" pooling over the attention mask — on the reference's text: every turn as
    <|prompter|>/<|assistant|> + text + <|endoftext|>, cut from the left."""
    import torch
    from hub_mirror.models import OASST_PYTHIA_RM
    from huggingface_hub import snapshot_download
    from transformers import GPTNeoXConfig, GPTNeoXModel

    from farm.models import load_reward_model, oasst_chat_ids, reward_scores

    model, tok = load_reward_model(OASST_PYTHIA_RM)
    assert tok.sep_token is not None and tok.pad_token == "<|padding|>"  # not read as an encoder's pair
    folder = Path(snapshot_download(OASST_PYTHIA_RM))
    cfg = json.loads((folder / "config.json").read_text())
    state = torch.load(folder / "pytorch_model.bin")
    body = GPTNeoXModel(GPTNeoXConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "pooling")}))
    body.load_state_dict({k.removeprefix("gpt_neox."): v for k, v in state.items() if k.startswith("gpt_neox.")})
    head = torch.nn.Linear(cfg["hidden_size"], 1)
    head.load_state_dict({"weight": state["out_proj.weight"], "bias": state["out_proj.bias"]})
    body.eval()

    def reference(texts):  # OpenAssistant's forward, right-padded as their tokenizer pads
        batch = tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            hidden = body(**batch).last_hidden_state
            last = batch["attention_mask"].cumsum(1).argmax(1)
            return head(hidden[torch.arange(len(texts)), last]).squeeze(-1)

    prompts = [p for p, _ in PAIRS]
    answers = [r for _, r in PAIRS]
    ours = reward_scores(model, tok, prompts, answers, 2, 1024, 512)
    eos = tok.eos_token
    texts = []
    for p, a in PAIRS:
        turns = [t for t in p.split("\n\n") if t]
        written = "".join(
            f"<|{'prompter' if t.startswith('Human:') else 'assistant'}|>{t.split(':', 1)[1].strip()}{eos}"
            for t in turns
            if t.split(":", 1)[1].strip()
        )
        texts.append(written + f"<|assistant|>{a.strip()}{eos}")
    assert np.allclose(ours, reference(texts).numpy(), atol=1e-5) and len(set(ours.round(5))) == len(PAIRS)
    assert abs(float(state["out_proj.bias"])) > 0.1  # the bias is read: without it every reward would shift
    ids = oasst_chat_ids(tok, PAIRS[0][0], "word " * 3000, 64)
    assert len(ids) == 64 and ids[-1] == tok.eos_token_id  # the left is cut, the answer's end kept
