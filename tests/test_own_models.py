"""Base models unlike the demo's. A GPT-2, whose LoRAs vLLM 0.32 cannot serve: the "auto" engine
falls back to transformers. A tokenizer that starts every document with a BOS, as Llama's and Gemma's
do: the trainer and the service read every context with it, and they agree on the prompt, the
policy's log q and the base model's scores. A SentencePiece `tokenizer.model`, as Llama-2's (trained by
sentencepiece, converted by transformers at each load): a piece (a terminator, an ending, a sample's
text) is spelled as inside a document, without the word-start mark a text encoded alone gets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import peft
import pytest
import sentencepiece as sentencepiece_trainer
import torch
from service_world import Server, policy_log_q, save_adapter
from tokenizers import processors
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          PreTrainedTokenizerBase)

from adapters.errors import BaseModelMismatch
from adapters.fingerprint import fingerprint
from adapters.models import document_prefix, load_causal_lm, load_tokenizer, piece_ids, piece_text, tokenizer_digest
from adapters.reasoning import answer_log_probs, final_value, read_answers
from adapters.store import AdapterStore
from service.app import create_app
from service.settings import Settings
from trainer.rollout import Rollout
from trainer.scoring import Scorer
from trainer.tasks.base import single_token
from trainer.tasks.infill import InfillConfig, InfillRecord, InfillTask
from trainer.tasks.reasoning import ReasoningConfig, ReasoningTask
from world.corpus import CorpusConfig, documents

PREFIX, SUFFIX = "Tom went to the market.", "He ate it on the way home."


@pytest.fixture(scope="module")
def bos_model(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model with a tokenizer that puts its BOS (<|endoftext|>, also its pad and eos)
    before every document; the demo's own tokenizer puts nothing there, like GPT-2's."""
    out = tmp_path_factory.mktemp("bos") / "model"
    shutil.copytree(demo_model, out)
    tokenizer = load_tokenizer(out)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, tokenizer.bos_token_id)])
    tokenizer.save_pretrained(out)
    return out


def log_p(model, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context), by hand: one unpadded forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([context + continuation])).logits[0, len(context) - 1:-1]
    return float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(continuation)[:, None]).sum())


def test_the_document_prefix_is_what_the_tokenizer_puts_first(demo_model: Path, bos_model: Path):
    assert document_prefix(load_tokenizer(demo_model)) == []
    tokenizer = load_tokenizer(bos_model)
    assert document_prefix(tokenizer) == [tokenizer.bos_token_id] == tokenizer("Tom")["input_ids"][:1]


LLAMA2_TOKENIZER_CONFIG = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                           "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "legacy": False}


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer as Llama-2's repository ships it: a SentencePiece `tokenizer.model` (BPE, byte
    fallback, digits alone, a "▁" before each document) and a config naming LlamaTokenizer, no
    tokenizer.json, so that every load converts it; trained by sentencepiece on demo lines."""
    out = tmp_path_factory.mktemp("sentencepiece")
    sentencepiece_trainer.SentencePieceTrainer.train(
        sentence_iterator=iter(documents(CorpusConfig())[:3000]), model_prefix=str(out / "tokenizer"),
        vocab_size=600, model_type="bpe", byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2)
    (out / "tokenizer.vocab").unlink()
    (out / "tokenizer_config.json").write_text(json.dumps(LLAMA2_TOKENIZER_CONFIG))
    return out


@pytest.fixture(scope="module")
def sentencepiece(sentencepiece_dir: Path) -> PreTrainedTokenizerBase:
    return load_tokenizer(sentencepiece_dir)


@pytest.fixture(scope="module")
def llama2_like(sentencepiece_dir: Path, sentencepiece: PreTrainedTokenizerBase,
                tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random Llama with the SentencePiece tokenizer (a BOS before every document), as Llama-2."""
    out = tmp_path_factory.mktemp("llama2") / "model"
    shutil.copytree(sentencepiece_dir, out)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(sentencepiece), hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=256,
                                 initializer_range=0.3,  # a sharp random model: the BOS moves its log-probs
                                 bos_token_id=sentencepiece.bos_token_id,
                                 eos_token_id=sentencepiece.eos_token_id)).save_pretrained(out)
    return out


INFILL = InfillConfig(max_len=20)  # room for every demo middle in these tokenizers' pieces (the demo's takes 12)


def _served(model_dir: Path, root: Path, engine: str = "transformers"):
    """The service on ``model_dir`` with an infill and a reasoning adapter."""
    tokenizer = load_tokenizer(model_dir)
    store = AdapterStore(root / "adapters")
    for seed, task in enumerate([InfillTask(INFILL, tokenizer), ReasoningTask(ReasoningConfig(), tokenizer)]):
        save_adapter(store, task.name, model_dir, task.manifest_fields(), seed=seed, scale=0.1)
    settings = Settings(engine=engine, store=store.root, base_model=str(model_dir), torch_threads=1)
    with Server(create_app(settings)) as server, server.client() as client:
        yield model_dir, store, client


@pytest.fixture(scope="module")
def served_bos(bos_model: Path, tmp_path_factory: pytest.TempPathFactory):
    yield from _served(bos_model, tmp_path_factory.mktemp("served-bos"))


@pytest.fixture(scope="module")
def served_llama2(llama2_like: Path, tmp_path_factory: pytest.TempPathFactory):
    yield from _served(llama2_like, tmp_path_factory.mktemp("served-llama2"))


@pytest.fixture(scope="module")
def served_llama2_vllm(llama2_like: Path, tmp_path_factory: pytest.TempPathFactory):
    yield from _served(llama2_like, tmp_path_factory.mktemp("served-llama2-vllm"), "vllm")


@pytest.mark.parametrize("served", ["served_bos", "served_llama2",
                                    pytest.param("served_llama2_vllm", marks=pytest.mark.slow)])
def test_infill_prompts_scores_and_rewards_agree_between_trainer_and_service(served: str, request):
    """Prompts and contexts are encoded as the tokenizer encodes a document (BOS first), the ending
    as it reads inside the story; the service's log q and score are the trainer's policy and reward."""
    model_dir, store, client = request.getfixturevalue(served)
    tokenizer = load_tokenizer(model_dir)
    eos = tokenizer.eos_token_id
    task = InfillTask(INFILL, tokenizer)
    prompt = task.prompt(InfillRecord(prefix=PREFIX, suffix=SUFFIX))
    context, ending = task.context_ids(PREFIX), task.ids(" " + SUFFIX)
    assert prompt.ids == tokenizer(prompt.key)["input_ids"] and prompt.ids[0] == tokenizer.bos_token_id
    assert context + ending == tokenizer(PREFIX + " " + SUFFIX)["input_ids"]

    reply = client.post("/infill", json={"prefix": PREFIX, "suffix": SUFFIX, "n": 4, "seed": 3, "score": True})
    assert reply.status_code == 200, reply.text
    base, loaded = load_causal_lm(model_dir), store.load("infill", 1)
    adapted = peft.PeftModel.from_pretrained(load_causal_lm(model_dir), loaded.path).eval()
    for sample in reply.json()["samples"]:
        z = sample["token_ids"]
        assert sample["text"] == task.text(z)
        expected_q = policy_log_q(adapted, prompt.ids, z, sample["stopped"], eos, loaded.manifest.min_len)
        assert sample["log_q"] == pytest.approx(expected_q, rel=1e-3)
        expected = log_p(base, context, z + ending)
        assert sample["log_p"] == pytest.approx(expected, rel=1e-3)
        assert abs(log_p(base, context[1:], z + ending) - expected) > 0.01  # the BOS matters to these models
        rollout = Rollout([prompt.ids], torch.tensor([z]), torch.tensor([len(z)]), torch.zeros(1, len(z), dtype=torch.bool))
        reward = task.log_rewards(Scorer(base, eos), [prompt], rollout)[0, len(z)]
        assert float(reward) == pytest.approx(expected, rel=1e-3)  # what training rewarded, the service scores


def test_an_adapter_from_before_the_prefix_is_served_as_it_was_trained(bos_model: Path, tmp_path: Path):
    """A manifest without `document_prefix` (trained before contexts began with the BOS) is served
    without it: its prompt as training read it."""
    tokenizer = load_tokenizer(bos_model)
    task = InfillTask(InfillConfig(), tokenizer)
    fields = {k: v for k, v in task.manifest_fields().items() if k != "document_prefix"}
    store = AdapterStore(tmp_path / "adapters")
    loaded = store.load("infill", save_adapter(store, "infill", bos_model, fields, seed=0, scale=0.1).version)
    assert task.manifest_fields()["document_prefix"] == [tokenizer.bos_token_id] and loaded.manifest.document_prefix == []
    settings = Settings(engine="transformers", store=store.root, base_model=str(bos_model), torch_threads=1)
    with Server(create_app(settings)) as server, server.client() as client:
        reply = client.post("/infill", json={"prefix": PREFIX, "suffix": SUFFIX, "n": 2, "seed": 3})
    assert reply.status_code == 200, reply.text
    adapted = peft.PeftModel.from_pretrained(load_causal_lm(bos_model), loaded.path).eval()
    prompt = task.prompt(InfillRecord(prefix=PREFIX, suffix=SUFFIX)).ids[1:]  # no BOS
    for sample in reply.json()["samples"]:
        expected = policy_log_q(adapted, prompt, sample["token_ids"], sample["stopped"], tokenizer.eos_token_id)
        assert sample["log_q"] == pytest.approx(expected, rel=1e-3)


def test_an_adapter_is_refused_under_another_tokenizer_on_the_same_weights(demo_model: Path, bos_model: Path,
                                                                           tmp_path: Path):
    """The BOS copy has the demo's weights (one fingerprint) but another tokenizer: an adapter trained
    on the demo would be served on prompts it never saw. Manifests without a tokenizer digest load."""
    assert fingerprint(bos_model) == fingerprint(demo_model)
    store = AdapterStore(tmp_path / "adapters")
    fields = InfillTask(InfillConfig(), load_tokenizer(demo_model)).manifest_fields()
    save_adapter(store, "infill", demo_model, fields, seed=0)
    with pytest.raises(BaseModelMismatch, match="another tokenizer"):
        store.load("infill", 1, fingerprint(bos_model), tokenizer_digest(load_tokenizer(bos_model)))
    demo_digest = tokenizer_digest(load_tokenizer(demo_model))
    assert store.load("infill", 1, fingerprint(demo_model), demo_digest).manifest.base_model.tokenizer == demo_digest
    settings = Settings(engine="transformers", store=store.root, base_model=str(bos_model), torch_threads=1)
    with Server(create_app(settings)) as server, server.client() as client:
        ready = client.get("/ready").json()
    assert ready["adapters"] == [] and "another tokenizer" in ready["refused"]["infill@v1"]


def test_reason_reads_answers_as_the_trainer_does(bos_model: Path, served_bos):
    """/reason's answers (read by the base model where a rationale does not end with the
    calculator's value) and their log p(Y | X Z) are the trainer's, BOS included."""
    _, _, client = served_bos
    task = ReasoningTask(ReasoningConfig(), load_tokenizer(bos_model))
    question = "Question: 3 + 4 - 2 = ? Answer:"
    reply = client.post("/reason", json={"question": question, "n_rationales": 32, "seed": 1})
    assert reply.status_code == 200, reply.text
    rationales = [r["text"] for r in reply.json()["rationales"]]
    scorer = Scorer(load_causal_lm(bos_model), task.tokenizer.eos_token_id)
    questions = [question] * len(rationales)
    answers = read_answers(questions, rationales, task.format, task.completer(scorer))
    weights = answer_log_probs(questions, rationales, answers, task.format, task.log_prob_scorer(scorer))
    assert any(final_value(z) is None and a is not None for z, a in zip(rationales, answers))  # the model read some
    for served_one, answer, weight in zip(reply.json()["rationales"], answers, weights):
        assert served_one["answer"] == answer
        assert served_one["log_p_answer"] == (None if answer is None else pytest.approx(weight, rel=1e-3))


def test_a_tokenizer_model_file_loads_as_sentencepiece_spells_it(sentencepiece_dir: Path, sentencepiece):
    """transformers converts `tokenizer.model` at every load: the ids are those sentencepiece (which
    the base model was trained with) gives, BOS first, and the digest an adapter records is the
    same at the next load, so a restart does not refuse its adapters."""
    own = sentencepiece_trainer.SentencePieceProcessor(model_file=str(sentencepiece_dir / "tokenizer.model"))
    assert not (sentencepiece_dir / "tokenizer.json").exists()
    for line in documents(CorpusConfig())[::50] + ["Tom said:\n\"é, ü; 漢字!\"", "a  b\tc"]:
        assert sentencepiece(line)["input_ids"] == [sentencepiece.bos_token_id] + own.encode(line), line
    assert tokenizer_digest(load_tokenizer(sentencepiece_dir)) == tokenizer_digest(sentencepiece)


def test_sentencepiece_pieces_are_spelled_as_inside_a_document(sentencepiece):
    tokenizer = sentencepiece
    dot = tokenizer.convert_tokens_to_ids(".")
    alone = tokenizer.convert_ids_to_tokens(tokenizer(".", add_special_tokens=False)["input_ids"])
    assert alone in (["▁."], ["▁", "."])  # a word start: " ." in running text, which "home." does not have
    assert single_token(tokenizer, ".") == dot
    beginning, ending = "Tom went to the market.", " He ate it on the way home."
    story = tokenizer(beginning + ending, add_special_tokens=False)["input_ids"]
    assert tokenizer(beginning, add_special_tokens=False)["input_ids"] + piece_ids(tokenizer, ending) == story
    assert tokenizer.decode(piece_ids(tokenizer, ending)) == ending[1:]  # the decoder drops a leading space
    assert piece_text(tokenizer, piece_ids(tokenizer, ending)) == ending  # a piece keeps it
    rationale = piece_ids(tokenizer, " 6 - 0 = 6, 6 - 4 = 2")  # "▁" "6" "▁-" ...: the mask lets each through
    assert set(rationale) <= set(ReasoningTask(ReasoningConfig(), tokenizer).mask().token_ids)


def test_byte_level_pieces_are_spelled_as_alone(demo_model: Path):
    """The demo's (and GPT-2's) tokenizer spells a piece alike inside a document and alone."""
    tokenizer = load_tokenizer(demo_model)
    for line in documents(CorpusConfig())[:500]:
        for text in (line, " " + line, line[len(line) // 2:], "  two spaces", "\nnewline"):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert piece_ids(tokenizer, text) == ids and piece_text(tokenizer, ids) == tokenizer.decode(ids)


def _small(model_class: type, config: object, demo_model: Path, out: Path) -> Path:
    """A small random model of another architecture, with the demo tokenizer."""
    torch.manual_seed(0)
    model_class(config).save_pretrained(out)
    load_tokenizer(demo_model).save_pretrained(out)
    return out


def test_vllm_refuses_at_start_an_lm_head_lora_its_model_class_cannot_serve(demo_model: Path, tmp_path: Path):
    """vLLM 0.32 serves an lm_head LoRA on Llama only: on Mistral (Qwen2, Gemma2) it started, then
    refused every such adapter at its load, the bundled infill and constrained ones among them."""
    import asyncio

    from adapters.manifest import LoraSpec
    from service.engines import start_engine

    size = len(load_tokenizer(demo_model))
    model_dir = _small(MistralForCausalLM, MistralConfig(vocab_size=size, hidden_size=128, intermediate_size=256,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2), demo_model, tmp_path / "m")
    loras = [LoraSpec(target_modules=["q_proj", "lm_head"])]

    async def start(engine: str) -> str:
        settings = Settings(engine=engine, store=tmp_path / "adapters", base_model=str(model_dir), torch_threads=1)
        started = await start_engine(settings, model_dir, 0, 0, loras)
        await started.stop()
        return started.name

    with pytest.raises(ValueError, match="vLLM serves no LoRA on lm_head for MistralForCausalLM.*GFN_ENGINE=transformers"):
        asyncio.run(start("vllm"))
    assert asyncio.run(start("auto")) == "transformers"  # on a CPU: the engine that serves it


@pytest.mark.slow  # vLLM's start and failure take a minute
def test_auto_serves_with_transformers_where_vllm_starts_but_cannot_run(demo_model: Path, tmp_path: Path):
    """A head size vLLM's CPU attention lacks (16) started, then killed the engine at the first
    request: the whole service with it."""
    size = len(load_tokenizer(demo_model))
    model_dir = _small(LlamaForCausalLM, LlamaConfig(vocab_size=size, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4), demo_model, tmp_path / "l")
    settings = Settings(engine="auto", store=tmp_path / "adapters", base_model=str(model_dir), torch_threads=1)
    with Server(create_app(settings)) as server, server.client() as client:
        assert client.get("/ready").json()["engine"] == "transformers"


@pytest.mark.slow  # vLLM's failed start takes half a minute
def test_auto_serves_with_transformers_where_vllm_cannot(demo_model: Path, tmp_path: Path):
    tokenizer = load_tokenizer(demo_model)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=64, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    model_dir = _small(GPT2LMHeadModel, config, demo_model, tmp_path / "gpt2")
    store = AdapterStore(tmp_path / "adapters")
    fields = InfillTask(InfillConfig(), tokenizer).manifest_fields()
    save_adapter(store, "infill", model_dir, fields, seed=0, targets=["c_attn", "c_proj"])
    settings = Settings(engine="auto", store=store.root, base_model=str(model_dir), torch_threads=1)
    with Server(create_app(settings)) as server, server.client() as client:
        assert client.get("/ready").json()["engine"] == "transformers"
        reply = client.post("/infill", json={"prefix": PREFIX, "suffix": SUFFIX, "n": 2, "seed": 0})
    assert reply.status_code == 200 and len(reply.json()["samples"]) == 2


def test_a_damaged_or_missing_base_model_is_named(demo_model: Path, tmp_path: Path):
    """transformers' and json's own messages name neither the model nor the file."""
    from adapters.models import BaseModelUnreadable
    from trainer.setup import resolve_base_model

    broken = tmp_path / "model"
    shutil.copytree(demo_model, broken)
    (broken / "config.json").write_text('{"model_type": ')
    with pytest.raises(ValueError, match=f"{broken / 'config.json'} is not JSON"):
        fingerprint(broken)
    with pytest.raises(BaseModelUnreadable, match=f"cannot load the model at {broken}"):
        load_causal_lm(broken)
    shutil.copy(demo_model / "config.json", broken)
    weights = bytearray((broken / "model.safetensors").read_bytes())
    weights[3] ^= 0xFF  # the header's length
    (broken / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(BaseModelUnreadable, match="SafetensorError"):
        load_causal_lm(broken)
    with pytest.raises(FileNotFoundError, match="base model 'dmeo' is no directory here, nor found on the hub"):
        resolve_base_model("dmeo")
