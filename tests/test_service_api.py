"""The service through real HTTP (uvicorn on 127.0.0.1), with both engines: every endpoint, bad
inputs, adapter versions swapped under load, the rationale cache, metrics, and the two engines
serving the same distribution."""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import peft
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from service_world import TARGETS, Server, make_store, metric, save_adapter, task_fields, wait_until

from adapters.models import load_causal_lm, load_tokenizer
from adapters.store import AdapterStore
from service.app import create_app
from service.engines.base import GenRequest
from service.settings import Settings

KEY = "test-key"
INFILL = {"prefix": "Tom went to the market.", "suffix": "He ate it on the way home."}


@pytest.fixture(scope="module")
def store(demo_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """An adapter of every task, and `rng7`: rng whose manifest lets a sample stop only after a 7."""
    from trainer.tasks.rng import RngConfig, RngTask

    store = make_store(tmp_path_factory.mktemp("service") / "adapters", demo_model)
    fields = RngTask(RngConfig(stop_after=["7"]), load_tokenizer(demo_model)).manifest_fields()
    save_adapter(store, "rng7", demo_model, fields, seed=7)
    return store


def _serve(store, demo_model: Path, engine: str):
    settings = Settings(engine=engine, store=store.root, base_model=str(demo_model), api_key=KEY, torch_threads=1,
                        max_n=64, max_loras=2)
    return Server(create_app(settings))


@pytest.fixture(scope="module")
def hf(store, demo_model):
    with _serve(store, demo_model, "transformers") as server:
        yield server


@pytest.fixture(scope="module")
def vllm(store, demo_model):
    with _serve(store, demo_model, "vllm") as server:
        yield server


@pytest.fixture(params=["hf", "vllm"])
def client(request):
    with request.getfixturevalue(request.param).client(headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


def test_every_endpoint_answers(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    assert ready["ready"] and ready["redis"] == "not configured"
    assert {ref.partition("@")[0] for ref in ready["adapters"]} >= {"infill", "rng", "reasoning", "constrained", "continuation"}

    infill = client.post("/infill", json={**INFILL, "n": 3, "seed": 7, "score": True})
    assert infill.status_code == 200 and infill.headers["x-request-id"]
    body = infill.json()
    assert body["adapter"].startswith("infill@v") and len(body["samples"]) == 3
    for sample in body["samples"]:
        assert sample["log_q"] < 0 and sample["log_p"] < 0 and len(sample["token_ids"]) <= 20
    again = client.post("/infill", json={**INFILL, "n": 3, "seed": 7}).json()
    assert [s["token_ids"] for s in again["samples"]] == [s["token_ids"] for s in body["samples"]]

    constrained = client.post("/generate", json={"keywords": ["cat", "garden"], "avoid": ["dog"], "n": 32}).json()
    assert constrained["adapter"].startswith("constrained@v") and len(constrained["samples"]) == 32
    texts = [s["text"] for s in constrained["samples"]]  # the manifest's word bias: keywords +8, avoided -99
    # " cat" in 70% of them on average (15 of 32 is seen): 10 leaves a one-in-a-million miss
    assert not any(" dog" in t for t in texts) and sum(" cat" in t for t in texts) >= 10, texts
    numbers = client.post("/generate", json={"adapter": "rng", "n": 16}).json()["samples"]
    assert all(s["text"].isdigit() and 1 <= len(s["token_ids"]) <= 3 for s in numbers)  # the digits-only mask
    sentences = client.post("/generate", json={"adapter": "continuation", "text": "The cat sat.", "n": 4}).json()
    assert all("." not in s["text"] and len(s["token_ids"]) >= 1 for s in sentences["samples"])  # "." ends them

    reason = client.post("/reason", json={"question": "3 + 4 - 2", "n_rationales": 4}).json()
    assert reason["question"] == "Question: 3 + 4 - 2 = ? Answer:" and len(reason["rationales"]) == 4
    assert reason["cached"] == 0
    assert reason["counts"] and math.isclose(sum(reason["distribution"].values()), 1.0)
    valued = [(r, step) for r in reason["rationales"] for step in r["steps"] if step["value"] is not None]
    assert valued  # the calculator wrote every well-formed step's value
    for rationale, step in valued:
        assert f"{step['expression']} = {step['value']}" in " ".join(rationale["text"].split())

    adapters = client.get("/adapters").json()["loaded"]
    assert {a["name"] for a in adapters if a["routed"]} >= {"infill", "rng"}


def test_a_request_may_name_a_version_and_must_fit_the_context(client):
    named = client.post("/generate", json={"adapter": "rng@v1", "n": 2})
    assert named.status_code == 200 and named.json()["adapter"] == "rng@v1"
    long = client.post("/generate", json={"adapter": "continuation", "text": "The cat sat. " * 300, "n": 1})
    assert long.status_code == 422 and "text" in long.text and "context of 512 tokens" in long.text, long.text


def test_unloading_a_version_waits_for_its_requests_in_flight(hf):
    """DELETE /adapters/... while a request runs on that version: the request finishes on it, then
    the version leaves; naming it in POST /adapters brings it back."""
    with hf.client(headers={"X-API-Key": KEY}) as client, ThreadPoolExecutor(2) as pool:
        ref = client.post("/generate", json={"adapter": "continuation", "text": "The cat sat.", "n": 1}).json()["adapter"]
        running = pool.submit(client.post, "/generate", json={"adapter": ref, "text": "The cat sat.", "n": 64,
                                                                "temperature": 2.0, "seed": 3})

        def in_flight() -> int:
            return next(a["in_flight"] for a in client.get("/adapters").json()["loaded"] if a["ref"] == ref)

        while in_flight() == 0:
            assert not running.done(), running.result().text
        deleted = pool.submit(client.delete, f"/adapters/{ref.replace('@v', '/')}")
        answer = running.result()
        assert answer.status_code == 200 and answer.json()["adapter"] == ref and len(answer.json()["samples"]) == 64
        assert deleted.result().json() == {"unloaded": ref}
        assert ref not in {a["ref"] for a in client.get("/adapters").json()["loaded"]}
        name, _, version = ref.partition("@v")
        assert client.post("/adapters", json={"name": name, "version": int(version)}).status_code == 201


def test_rationale_cache_returns_the_same_number(client):
    question = {"question": "Question: 9 - 3 + 1 = ? Answer:", "n_rationales": 3, "seed": 11, "aggregate": "weighted"}
    first = client.post("/reason", json=question).json()
    second = client.post("/reason", json=question).json()
    assert first["cached"] == 0 and second["cached"] == 3
    assert second["rationales"] == first["rationales"] and second["answer"] == first["answer"]
    more = client.post("/reason", json={**question, "n_rationales": 5}).json()
    assert more["cached"] == 3 and more["rationales"][:3] == first["rationales"] and len(more["rationales"]) == 5
    other = client.post("/reason", json={**question, "temperature": 0.5}).json()
    assert other["cached"] == 0  # other sampling settings: another pool
    counted = {s.name: s.value for f in text_string_to_metric_families(client.get("/metrics").text)
               for s in f.samples if s.labels.get("adapter") == first["adapter"].partition("@")[0]}
    assert counted["gfn:cache_lookups_total"] >= 4 and counted["gfn:cache_hits_total"] >= 1
    lookups = metric(client, "gfn:cache_lookups_total", adapter="reasoning")
    assert client.post("/reason", json={**question, "max_tokens": 400}).status_code == 422  # past max_len 48
    assert metric(client, "gfn:cache_lookups_total", adapter="reasoning") == lookups  # a refused request looked up


@pytest.mark.parametrize("body, field", [
    ({"prefix": "a"}, "suffix"),
    ({**INFILL, "n": 0}, "n"),
    ({**INFILL, "n": 65}, "n"),
    ({**INFILL, "temperature": -1}, "temperature"),
    ({**INFILL, "max_tokens": 21}, "max_tokens"),
    ({**INFILL, "nonsense": 1}, "nonsense"),
    ({**INFILL, "prefix": "x" * 5000}, "prefix"),
    ({**INFILL, "temperature": 1e-300}, "temperature"),  # would turn float32 logits into NaN
    ({**INFILL, "temperature": 2.5}, "temperature"),  # vLLM refuses above 2
    ({**INFILL, "n": "2"}, "n"),  # strict: a string or a boolean is no count
    ({**INFILL, "n": True}, "n"),
    ({**INFILL, "seed": "1"}, "seed"),
    ({**INFILL, "seed": 2**32}, "seed"),  # the CPU's generator keeps 32 bits: it would draw as seed 0
    ({**INFILL, "prefix": " \n\t"}, "prefix"),  # nothing to condition on
    ({**INFILL, "suffix": "  "}, "suffix"),
])
def test_bad_infill_gets_422_naming_the_field(client, body, field):
    response = client.post("/infill", json=body)
    assert response.status_code == 422
    assert any(field in error["loc"] for error in response.json()["detail"]), response.json()
    if field in body:  # the value given is echoed, as FastAPI's own checks do (the service's checks put null)
        assert all(error["input"] is not None for error in response.json()["detail"]), response.json()


def test_bad_requests_get_clear_errors(client):
    assert client.post("/reason", json={"question": "what is love?"}).status_code == 422
    neither = client.post("/generate", json={})  # the constrained template needs both: both named at once
    assert neither.status_code == 422 and [e["loc"][-1] for e in neither.json()["detail"]] == ["avoid", "keywords"]
    wrong_field = client.post("/generate", json={"adapter": "rng", "keywords": ["cat"]})
    assert wrong_field.status_code == 422 and "keywords" in wrong_field.json()["detail"][0]["loc"]
    missing = client.post("/infill", json={**INFILL, "adapter": "nope"})
    assert missing.status_code == 404 and "nope" in missing.json()["detail"]
    assert client.post("/infill", json={**INFILL, "adapter": "infill@v99"}).status_code == 404
    for bad in (client.post("/infill", json={**INFILL, "adapter": "../etc"}),  # each names where the name was
                client.post("/reason", json={"question": "1 + 2", "adapter": "rng@v0"}),
                client.post("/adapters", json={"name": "Infill"}), client.delete("/adapters/in fill/1")):
        error = bad.json()["detail"][0]
        assert bad.status_code == 422 and error["loc"][-1] in ("adapter", "name") and "adapter" in error["msg"], bad.text
    for path, body, home in (("/infill", {**INFILL, "adapter": "rng"}, "/generate"),
                             ("/generate", {"adapter": "infill"}, "/infill"),
                             ("/reason", {"question": "1 + 2", "adapter": "rng"}, "/generate")):
        wrong = client.post(path, json=body)  # it blamed a field the endpoint requires, or has not
        error = wrong.json()["detail"][0]
        assert wrong.status_code == 422 and error["loc"] == ["body", "adapter"], wrong.text
        assert f"POST {home} serves it" in error["msg"], wrong.text
    assert client.post("/adapters", json={"name": "absent"}).status_code == 404
    assert client.delete("/adapters/absent/1").status_code == 404
    assert client.post("/infill", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    twice = client.post("/infill", content=b'{"prefix": "a", "suffix": "b", "n": 1, "n": 2}',
                        headers={"content-type": "application/json"})  # the last one won: 2 samples
    assert twice.status_code == 422 and twice.json()["detail"][0]["loc"] == ["body", "n"], twice.text
    plain = client.post("/infill", json=INFILL, headers={"content-type": "text/plain"})  # "a valid dictionary"
    assert plain.status_code == 415 and "application/json" in plain.json()["detail"], plain.text
    assert client.head("/health").status_code == 200  # load balancers probe with HEAD: 405
    surrogate = client.post("/infill", content=b'{"prefix": "a\\ud800", "suffix": "b"}',
                            headers={"content-type": "application/json"})  # valid JSON, not valid UTF-8
    assert surrogate.status_code == 422 and "prefix" in surrogate.json()["detail"][0]["loc"]
    for keywords in ([], [""], ["cat, dog"]):
        bad = client.post("/generate", json={"keywords": keywords})
        assert bad.status_code == 422 and "keywords" in bad.json()["detail"][0]["loc"], keywords
    spaces = client.post("/reason", json={"question": "1 + 1" + " " * 4000 + "x"})  # once a regex's cubic backtracking
    assert spaces.status_code == 422 and "question" in spaces.json()["detail"][0]["loc"]
    nan = client.post("/infill", content=b'{"prefix": "a", "suffix": "b", "temperature": NaN}',
                      headers={"content-type": "application/json"})  # Python's JSON reads NaN
    assert nan.status_code == 422 and "finite" in nan.json()["detail"][0]["msg"]
    json.loads(nan.text, parse_constant=lambda c: pytest.fail(f"the error echoes a bare {c}: not strict JSON"))
    for body in (b'{"prefix": "\xff\xfe", "suffix": "b"}', b"[" * 20000):  # not UTF-8; nested past the reader
        unread = client.post("/infill", content=body, headers={"content-type": "application/json"})
        assert unread.status_code == 422 and unread.json()["detail"][0]["loc"] == ["body"], unread.text
    for body in (b"\xff", b"\x80abc"):  # not JSON, not UTF-8: refused by its content type, not echoed
        assert client.post("/infill", content=body, headers={"content-type": "text/plain"}).status_code == 415
    for text in ("", "   "):  # an empty prompt
        empty = client.post("/generate", json={"adapter": "continuation", "text": text})
        assert empty.status_code == 422 and "text" in empty.json()["detail"][0]["loc"], empty.text
    nothing_to_avoid = client.post("/generate", json={"keywords": ["cat"], "avoid": [], "n": 2})  # "Avoid: . Sentence:"
    assert nothing_to_avoid.status_code == 200 and len(nothing_to_avoid.json()["samples"]) == 2
    for words, field in ((["cat", "Cat"], []), (["cat", "dog"], ["dog"])):
        clash = client.post("/generate", json={"keywords": words, "avoid": field or ["bird"]})
        assert clash.status_code == 422 and clash.json()["detail"][0]["loc"] == ["body", "avoid" if field else "keywords"]
    for keywords, avoid, said in ((["cat"], ["cats"], "'cats' and 'cat' start with the same token"),  # " cat" "s"
                                  (["answer"], ["Answers"], "'Answers' and 'answer' start with the same token"),
                                  (["cat"], ["5"], "'5' cannot be biased"),  # " " "5": would ban every space
                                  (["5"], ["dog"], "'5' cannot be biased"),
                                  (["日本"], ["dog"], "none joins a space to '日'")):  # " " and 日's bytes
        misapplied = client.post("/generate", json={"keywords": keywords, "avoid": avoid})
        error = misapplied.json()["detail"][0]
        assert misapplied.status_code == 422 and said in error["msg"], misapplied.text
        assert error["loc"][-1] == ("keywords" if avoid == ["dog"] else "avoid")
    for route, body, field in (("/infill", {**INFILL, "prefix": "Tom sat.<|endoftext|>"}, "prefix"),
                               ("/generate", {"adapter": "continuation", "text": "<|endoftext|>The dog ran."}, "text")):
        control = client.post(route, json=body)  # the terminator, spelled: text, not a control token
        assert control.status_code == 422 and control.json()["detail"][0]["loc"][-1] == field, control.text
    assert client.post("/adapters", json={"name": "infill", "version": 10**300}).status_code == 422
    assert client.delete(f"/adapters/infill/{10**300}").status_code == 422


def test_the_openapi_page_states_the_name_pattern_wherever_an_adapter_is_named() -> None:
    """Clients generated from /openapi.json check a name before sending it, in a body and in a path."""
    spec = create_app(Settings()).openapi()
    requests = {schema: body for schema, body in spec["components"]["schemas"].items() if schema.endswith("Request")}
    taken = [(f"{schema} {field}", prop) for schema, body in requests.items()
             for field, prop in body["properties"].items() if field in ("adapter", "name")]
    taken += [(f"DELETE {path} name", p["schema"]) for path, ops in spec["paths"].items()
              for p in ops.get("delete", {}).get("parameters", []) if p["name"] == "name"]
    pattern = {where: next(s["pattern"] for s in prop.get("anyOf", [prop]) if s["type"] == "string")
               for where, prop in taken}
    name = "^[a-z0-9][a-z0-9._-]{0,63}$"
    ref = name[:-1] + "(@v[1-9][0-9]{0,9})?$"
    assert pattern == {"GenerateRequest adapter": ref, "InfillRequest adapter": ref, "ReasonRequest adapter": ref,
                       "LoadRequest name": name, "DELETE /adapters/{name}/{version} name": name}


def test_the_openapi_page_asks_for_a_key_only_where_one_is_set() -> None:
    """A client generated from /openapi.json sends the key, and expects 401s, as the deployment does."""
    for key, asked in ((None, False), (KEY, True)):
        spec = create_app(Settings(api_key=key)).openapi()
        assert ("securitySchemes" in spec.get("components", {})) is asked
        for path, operations in spec["paths"].items():
            for operation in operations.values():
                probe = path in ("/health", "/ready", "/metrics")
                assert ("security" in operation) is ("401" in operation["responses"]) is (asked and not probe), path


def test_a_wrong_method_is_told_every_method_of_the_path(hf):
    with hf.client() as client:
        for path, methods in (("/adapters", "GET, POST"), ("/jobs/abc", "DELETE, GET"), ("/infill", "POST")):
            reply = client.request("PUT", path)
            assert reply.status_code == 405 and reply.headers["allow"] == methods, path


def test_key_is_required_except_on_probes(hf):
    with hf.client() as anonymous:
        assert anonymous.post("/infill", json=INFILL).status_code == 401
        assert anonymous.get("/adapters").status_code == 401
        assert anonymous.post("/infill", json=INFILL, headers={"X-API-Key": "wrong"}).status_code == 401
        assert anonymous.post("/infill", json=INFILL, headers={"X-API-Key": KEY}).status_code == 200
        malformed = anonymous.post("/infill", content=b'{"prefix": ', headers={"content-type": "application/json"})
        assert malformed.status_code == 401 and "prefix" not in malformed.text  # the key before the body
        assert anonymous.post("/infill", json={"n": "x"}, headers={"Authorization": f"Bearer {KEY}"}).status_code == 422
        for probe in ("/health", "/ready", "/metrics"):
            assert anonymous.get(probe).status_code == 200


def test_new_version_replaces_the_old_under_load(request, client, store, demo_model):
    """Load infill v(N+1) and unload vN while requests run: none fails, new ones go to the new version."""
    fields = task_fields(load_tokenizer(demo_model))["infill"]
    new = save_adapter(store, "infill", demo_model, fields, seed=100 + len(store.versions("infill")))
    old = client.get("/adapters").json()["loaded"]
    old_ref = next(a["ref"] for a in old if a["name"] == "infill" and a["routed"])

    def infill(_: int) -> tuple[int, str]:
        response = client.post("/infill", json={**INFILL, "n": 2})
        return response.status_code, response.json().get("adapter", "")

    with ThreadPoolExecutor(8) as pool:
        running = [pool.submit(infill, i) for i in range(24)]
        loaded = client.post("/adapters", json={"name": "infill", "version": new.version})
        after = [pool.submit(infill, i) for i in range(8)]
        results = [f.result() for f in running + after]
    # 201, or 200 where the store's watcher saw the new version first and loaded it (a slow machine)
    assert loaded.status_code in (200, 201) and loaded.json()["routed"]
    assert [status for status, _ in results] == [200] * len(results)
    assert {ref for _, ref in results} <= {old_ref, new.ref}
    assert all(ref == new.ref for _, ref in results[len(running):])
    client.delete(f"/adapters/infill/{old_ref.rpartition('@v')[2]}")  # already retiring or gone: 200 or 404
    refs = {a["ref"] for a in client.get("/adapters").json()["loaded"]}
    assert new.ref in refs and old_ref not in refs


def test_metrics_parse_and_hold_the_service_metrics(client):
    samples_before = metric(client, "gfn:samples_total", adapter="infill")
    tokens_before = metric(client, "gfn:generation_tokens_total", adapter="infill")
    answer = client.post("/infill", json={**INFILL, "n": 3}).json()
    assert metric(client, "gfn:samples_total", adapter="infill") == samples_before + 3
    tokens = sum(len(sample["token_ids"]) for sample in answer["samples"])
    assert metric(client, "gfn:generation_tokens_total", adapter="infill") == tokens_before + tokens > tokens_before
    text = client.get("/metrics").text
    samples = {s.name: s for family in text_string_to_metric_families(text) for s in family.samples}
    for name in ("gfn:e2e_request_latency_seconds_bucket", "gfn:request_queue_time_seconds_bucket",
                 "gfn:time_to_first_sample_seconds_bucket", "gfn:requests_total", "gfn:generation_tokens_total",
                 "gfn:num_requests_running", "gfn:num_requests_waiting", "gfn:cache_lookups_total",
                 "gfn:cache_hits_total", "gfn:adapter_info", "gfn:adapter_load_seconds_bucket"):
        assert name in samples, name
    requests = [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == "gfn:requests_total"]
    assert any(s.labels == {"endpoint": "/infill", "adapter": "infill", "status": "200"} for s in requests)
    by_adapter = {(s.name, s.labels.get("adapter")): s.value for f in text_string_to_metric_families(text)
                  for s in f.samples}
    assert by_adapter["gfn:cache_lookups_total", "rng"] == 0  # every loaded adapter's counters start at zero
    info = [s.labels for f in text_string_to_metric_families(text) for s in f.samples if s.name == "gfn:adapter_info"]
    assert {"name": "rng", "version": "1", "rank": "8"} in info


def _numbers(server, n_requests: int = 16, temperature: float = 1.0) -> list[tuple[tuple[int, ...], float]]:
    body = {"adapter": "rng", "n": 64, "temperature": temperature}
    with server.client(headers={"X-API-Key": KEY}) as client, ThreadPoolExecutor(8) as pool:
        bodies = pool.map(lambda i: client.post("/generate", json={**body, "seed": 1000 * i}).json(), range(n_requests))
        return [(tuple(s["token_ids"]), s["log_q"]) for body in bodies for s in body["samples"]]


def test_engines_serve_the_same_distribution(hf, vllm):
    """Same adapter, two engines, through the API: the same law."""
    _assert_same_law(_numbers(hf), _numbers(vllm))


def test_engines_sample_a_tempered_policy_alike_and_report_its_log_q(hf, vllm, store, demo_model):
    """At temperature 0.5 both engines draw the same law, and log q is that of the tempered, masked
    policy: log softmax((logits + mask) / T), the stop barred before min_len."""
    samples = {"hf": _numbers(hf, temperature=0.5), "vllm": _numbers(vllm, temperature=0.5)}
    _assert_same_law(samples["hf"], samples["vllm"])
    from trainer.policy import PolicySpec, state_logits, transition_log_probs

    manifest = store.manifest("rng", 1)
    tokenizer = load_tokenizer(demo_model)
    prompt = tokenizer(manifest.prompt_template, add_special_tokens=False)["input_ids"]
    spec = PolicySpec(manifest.terminator_id, manifest.min_len, manifest.max_len, manifest.mask)
    model = peft.PeftModel.from_pretrained(load_causal_lm(demo_model), store.load("rng", 1).path).eval()
    for tokens, log_q in dict(samples["hf"][:64] + samples["vllm"][:64]).items():
        batch = torch.tensor([tokens])
        with torch.no_grad():
            logits = state_logits(model, [prompt], batch, tokenizer.pad_token_id)
            vocab = logits.shape[-1]
            logits = logits + spec.stop_penalty(spec.barred(batch), vocab) + spec.bias(vocab)[: len(tokens) + 1]
            log_pf, log_pterm = transition_log_probs(torch.log_softmax(logits / 0.5, -1), batch, manifest.terminator_id)
        # every sample stops (at max_len the stop is certain: its log-prob is 0)
        assert log_q == pytest.approx(float(log_pf.sum() + log_pterm[0, len(tokens)]), rel=1e-3, abs=1e-4), tokens


def _assert_same_law(hf_samples, vllm_samples) -> None:
    """The same log q for every sequence both engines drew, first tokens drawn alike by both, and
    each engine's frequent sequences drawn as often as its log q says."""
    drawn = {"hf": hf_samples, "vllm": vllm_samples}
    log_q = {name: dict(samples) for name, samples in drawn.items()}
    shared = log_q["hf"].keys() & log_q["vllm"].keys()
    assert len(shared) > 10
    for sequence in shared:
        assert log_q["hf"][sequence] == pytest.approx(log_q["vllm"][sequence], abs=2e-4), sequence
    n = len(hf_samples)
    first = {name: Counter(seq[:1] for seq, _ in samples) for name, samples in drawn.items()}
    tv = 0.5 * sum(abs(first["hf"][t] - first["vllm"][t]) for t in first["hf"].keys() | first["vllm"].keys()) / n
    assert tv < 0.1, tv  # sampling noise alone: about 0.04 at n = 1024
    for name, samples in drawn.items():
        for sequence, count in Counter(seq for seq, _ in samples).most_common(5):
            p = math.exp(log_q[name][sequence])
            assert abs(count / n - p) < 5 * math.sqrt(p * (1 - p) / n) + 0.01, (name, sequence, count / n, p)


def test_engines_serve_a_manifests_stop_rule(hf, vllm, store, demo_model):
    """The manifest's stop rule, served (rounds in vLLM, a per-row penalty in transformers): after
    the random-number prompt the policy would stop after any number; `rng7` may stop only after a
    7, so every stopped sample ends in 7, both engines draw the same law, and its log q is the
    policy's under the rule."""
    manifest = store.manifest("rng7")
    tokenizer = load_tokenizer(demo_model)
    prompt = tokenizer(manifest.prompt_template, add_special_tokens=False)["input_ids"]
    seven = tokenizer.convert_tokens_to_ids("7")
    assert manifest.stop_after == [seven]
    results = {}
    for name, server in (("hf", hf), ("vllm", vllm)):
        with server.client(headers={"Authorization": f"Bearer {KEY}"}) as client:
            answers = [client.post("/generate", json={"adapter": "rng7", "n": 64, "seed": 100 * i}) for i in range(16)]
        assert all(a.status_code == 200 and a.json()["adapter"] == manifest.ref for a in answers)
        results[name] = [s for a in answers for s in a.json()["samples"]]
    for samples in results.values():
        assert all(s["token_ids"][-1] == seven for s in samples if s["stopped"])
        assert sum(s["stopped"] for s in samples) > 48
    _assert_same_law(*([(tuple(s["token_ids"]), s["log_q"]) for s in results[name]] for name in ("hf", "vllm")))
    from trainer.policy import PolicySpec, policy_log_probs

    model = peft.PeftModel.from_pretrained(load_causal_lm(demo_model), store.load("rng7", 1).path).eval()
    spec = PolicySpec(manifest.terminator_id, manifest.min_len, manifest.max_len, manifest.mask, frozenset({seven}))
    for sample in results["vllm"][:16]:
        tokens = sample["token_ids"]
        with torch.no_grad():
            log_pf, log_pterm = policy_log_probs(model, spec, [prompt], torch.tensor([tokens]), manifest.terminator_id)
        stop = float(log_pterm[0, len(tokens)]) if sample["stopped"] else 0.0
        assert sample["log_q"] == pytest.approx(float(log_pf.sum()) + stop, rel=1e-3)


def test_vllm_refuses_an_adapter_beyond_its_configuration(vllm, store, demo_model):
    """A rank above the engine's, or modules it was not started with (vLLM would skip them and serve
    another policy): 409 naming the fix; the adapters loaded keep serving."""
    fields = task_fields(load_tokenizer(demo_model))["rng"]
    save_adapter(store, "rng-wide", demo_model, fields, seed=11, rank=64)
    save_adapter(store, "rng-mlp", demo_model, fields, seed=12, targets=TARGETS + ["gate_proj"])
    with vllm.client(headers={"Authorization": f"Bearer {KEY}"}) as client:
        wide = client.post("/adapters", json={"name": "rng-wide"})
        assert wide.status_code == 409 and "GFN_MAX_LORA_RANK=64" in wide.json()["detail"]
        mlp = client.post("/adapters", json={"name": "rng-mlp"})
        assert mlp.status_code == 409 and "GFN_LORA_TARGET_MODULES='[\"gate_proj\", " in mlp.json()["detail"]
        loaded = {a["name"] for a in client.get("/adapters").json()["loaded"]}
        assert not loaded & {"rng-wide", "rng-mlp"}
        assert client.post("/generate", json={"adapter": "rng", "n": 2}).status_code == 200


def test_vllm_started_before_its_adapters_serves_the_modules_its_settings_name(demo_model, tmp_path):
    """An empty store at start (`gfn up`'s first start, a fresh deployment): GFN_LORA_TARGET_MODULES
    lets adapters trained afterwards on the MLP and lm_head load and serve, scores included."""
    store = AdapterStore(tmp_path / "adapters")
    wide = ["gate_proj", "up_proj", "down_proj", "lm_head"]
    settings = Settings(engine="vllm", store=store.root, base_model=str(demo_model), api_key=KEY, torch_threads=1,
                        lora_target_modules=wide)
    with Server(create_app(settings)) as server, server.client(headers={"Authorization": f"Bearer {KEY}"}) as client:
        assert client.get("/adapters").json()["loaded"] == []
        fields = task_fields(load_tokenizer(demo_model))["infill"]
        save_adapter(store, "infill", demo_model, fields, seed=3, targets=TARGETS + wide)
        assert client.post("/adapters", json={"name": "infill"}).status_code == 201
        answer = client.post("/infill", json={**INFILL, "n": 2, "score": True})
        assert answer.status_code == 200 and len(answer.json()["samples"]) == 2
        assert all(math.isfinite(s["log_p"]) for s in answer.json()["samples"])


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_a_cancelled_request_leaves_the_engine_at_once(engine, request, demo_model):
    """A request cancelled mid-generation (its client gone, or timed out) stops costing compute:
    the engine reports nothing running once it is gone (vLLM reported its last step's count, for
    good), and once a short request started after the cancel is answered, nothing else runs,
    although the cancelled one had hundreds of tokens to go."""
    server = request.getfixturevalue(engine)
    eos = load_tokenizer(demo_model).eos_token_id
    prompt = load_tokenizer(demo_model)("The cat sat.", add_special_tokens=False)["input_ids"]
    long = GenRequest(prompt, None, eos, max_tokens=480, min_tokens=480, n=32, seed=1)
    short = GenRequest(prompt, None, eos, max_tokens=3, min_tokens=3, n=1, seed=2)

    async def settled(live) -> int:
        for _ in range(40):  # vLLM reports its scheduler's counts a step late; the transformers engine, at its next step
            if live.running == 0:
                break
            await asyncio.sleep(0.05)
        return live.running

    async def cancel_midway():
        live = server.state.engine
        task = asyncio.ensure_future(live.generate([long]))
        while live.running == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.wait([task])  # cancelled: vLLM's abort is on its way to the engine core
        alone = await settled(live)
        [answer] = await live.generate([short])
        return task.cancelled(), alone, answer, await settled(live)

    cancelled, alone, answer, running = server.call(cancel_midway())
    assert cancelled and alone == 0 and len(answer.samples[0].token_ids) == 3 and running == 0


def test_engines_score_alike(hf, vllm, demo_model):
    """Base-model log p(continuation | context) agrees within float32 tolerance."""
    tokenizer = load_tokenizer(demo_model)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    contexts = [encode("Tom went to the market."), encode("Question: 6 - 4 = ? Answer:"), encode("The")]
    continuations = [encode(" He ate it."), encode(" 6 - 4 = 2. The answer is 2."), encode(" cat sat in the garden.")]
    scores = {name: server.call(server.state.engine.score(contexts, continuations))
              for name, server in (("hf", hf), ("vllm", vllm))}
    assert scores["hf"] == pytest.approx(scores["vllm"], rel=1e-4)
    assert all(score < 0 for score in scores["hf"])


class Echo:
    """A test tool: after the digit 5, it writes a 0 (so samples take the tool path: rounds in vLLM)."""

    def __init__(self, tokenizer):
        self.five, self.zero = tokenizer.convert_tokens_to_ids("5"), tokenizer.convert_tokens_to_ids("0")
        self.triggers = frozenset({self.five})

    def __call__(self, tokens: list[int]) -> list[int]:
        return [self.zero]


def test_engines_agree_with_a_tool(hf, vllm, demo_model):
    """The tool path (in-batch in transformers, rounds in vLLM) gives the same samples' law and log q."""
    manifest = hf.state.registry.entries["rng@v1"].manifest
    prompt = load_tokenizer(demo_model)(manifest.prompt_template, add_special_tokens=False)["input_ids"]
    tool = Echo(load_tokenizer(demo_model))
    requests = [GenRequest(prompt, manifest.ref, manifest.terminator_id, manifest.max_len, manifest.min_len,
                           manifest.mask, n=64, seed=100 * i, tool=tool) for i in range(16)]
    drawn = {name: [(tuple(s.token_ids), s.log_q) for r in server.call(server.state.engine.generate(requests))
                    for s in r.samples] for name, server in (("hf", hf), ("vllm", vllm))}
    for samples in drawn.values():  # every 5 sampled before the end is followed by the tool's 0
        assert all(seq[i + 1] == tool.zero for seq, _ in samples for i in range(len(seq) - 1) if seq[i] == tool.five)
    _assert_same_law(drawn["hf"], drawn["vllm"])


def test_engines_agree_with_the_calculator(hf, vllm, store, demo_model):
    """The real tool (values of one to three tokens, such as " -6"; none after a malformed step),
    through both engines' tool paths: every step's value is the calculator's, and the law is the same."""
    from service.policy import render

    manifest = store.manifest("reasoning", 1)
    tokenizer = load_tokenizer(demo_model)
    prompt = tokenizer(render(manifest, {"question": "Question: 2 - 7 + 4 = ? Answer:"}), add_special_tokens=False)["input_ids"]

    def draw(max_tokens: int, seeds: int) -> dict[str, list]:
        requests = [GenRequest(prompt, manifest.ref, manifest.terminator_id, max_tokens, manifest.min_len, manifest.mask,
                               n=64, seed=100 * i, tool=hf.state.calculator) for i in range(seeds)]
        return {name: [s for r in server.call(server.state.engine.generate(requests)) for s in r.samples]
                for name, server in (("hf", hf), ("vllm", vllm))}

    valued, calculator = 0, hf.state.calculator
    for tokens in (s.token_ids for samples in draw(24, 4).values() for s in samples):  # a few steps each
        for i in (i for i, token in enumerate(tokens) if token in calculator.triggers):
            value = calculator(tokens[: i + 1])
            if value is not None and i + len(value) < len(tokens):  # the value was not cut at 24 tokens
                assert tokens[i + 1: i + 1 + len(value)] == value, tokenizer.decode(tokens)
                valued += 1
    assert valued > 100, valued
    short = draw(8, 16)  # one step each: short enough that both engines draw many of the same
    _assert_same_law(*([(tuple(s.token_ids), s.log_q) for s in short[name]] for name in ("hf", "vllm")))


def test_seeded_samples_grow_in_steps_through_tool_rounds(hf, vllm, demo_model):
    """Sample i of a seeded request is drawn as sample 0 of seed + i would be, through every
    tool round: a cached pool topped up from seed + cached equals one drawn at once (vLLM's
    later rounds once took seeds from seed + round * n, which also fell on other requests')."""
    manifest = hf.state.registry.entries["rng@v1"].manifest
    prompt = load_tokenizer(demo_model)(manifest.prompt_template, add_special_tokens=False)["input_ids"]
    tool = Echo(load_tokenizer(demo_model))

    def draw(server, n: int, seed: int) -> list[tuple[int, ...]]:
        request = GenRequest(prompt, manifest.ref, manifest.terminator_id, 6, manifest.min_len,  # room after the tool
                             manifest.mask, n=n, seed=seed, tool=tool)
        return [tuple(s.token_ids) for s in server.call(server.state.engine.generate([request]))[0].samples]

    for server in (hf, vllm):
        at_once = draw(server, 16, 7)
        assert at_once[:8] + draw(server, 8, 15) == at_once
        assert sum(tool.five in seq[:-1] for seq in at_once) >= 2  # some samples went on after a tool round
        assert [draw(server, 1, 7 + i)[0] for i in range(4)] == at_once[:4]


def test_a_pinned_version_keeps_serving_beside_a_newer_one(hf, store, demo_model):
    """Pinned, a version does not retire when a newer one loads: the name routes to the newer,
    `name@vN` still reaches the pinned one. (Last in the module: it adds rng7@v2.)"""
    with hf.client(headers={"X-API-Key": KEY}) as client:
        assert client.post("/adapters", json={"name": "rng7", "version": 1, "pin": True}).json()["pinned"]
        fields = store.manifest("rng7", 1).model_dump(include={"task", "task_config", "prompt_template", "terminator",
                                                               "terminator_id", "min_len", "max_len", "mask", "stop_after"})
        new = save_adapter(store, "rng7", demo_model, fields, seed=8)
        assert client.post("/adapters", json={"name": "rng7"}).json()["routed"]
        assert client.post("/generate", json={"adapter": "rng7", "n": 1}).json()["adapter"] == new.ref
        assert client.post("/generate", json={"adapter": "rng7@v1", "n": 1}).json()["adapter"] == "rng7@v1"
        versions = {a["ref"]: a for a in client.get("/adapters").json()["loaded"] if a["name"] == "rng7"}
        assert versions.keys() == {"rng7@v1", new.ref} and not versions["rng7@v1"]["retiring"]
        again = client.post("/adapters", json={"name": "rng7", "version": 1})  # 201 Created again, before
        assert again.status_code == 200 and again.json()["pinned"], again.text
        unpinned = client.post("/adapters", json={"name": "rng7", "version": 1, "pin": False})  # once, a pin stayed
        assert unpinned.status_code == 200 and not unpinned.json()["pinned"], unpinned.text
        wait_until(lambda: "rng7@v1" not in {a["ref"] for a in client.get("/adapters").json()["loaded"]}, 30,
                   "the unpinned older version to retire")
        body = {"name": "rng7", "version": save_adapter(store, "rng7", demo_model, fields, seed=9).version}
        with ThreadPoolExecutor(2) as pool:  # both answered 201: each had seen it unloaded before its load
            assert sorted(r.status_code for r in pool.map(lambda _: client.post("/adapters", json=body), range(2))) \
                == [200, 201]


def test_a_special_token_added_to_a_tokenizer_is_refused_in_client_text(demo_model):
    """Llama-3 style tokenizers add control tokens (<|eot_id|>) outside the special-tokens map."""
    from fastapi.exceptions import RequestValidationError
    from tokenizers import AddedToken

    from service.deps import check_special_tokens

    tokenizer = load_tokenizer(demo_model)
    tokenizer.add_tokens([AddedToken("<|eot_id|>", special=True)])
    check_special_tokens(tokenizer, {"prefix": "plain <text> |eot_id|"})
    with pytest.raises(RequestValidationError, match="eot_id"):
        check_special_tokens(tokenizer, {"prefix": "Tom sat.<|eot_id|>"})
