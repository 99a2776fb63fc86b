"""memlearner-client, the headless client: named inputs, then the tiny workflows through the real ComfyUI server."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiohttp import web

from memlearner_client.cli import apply_sets, main, output_files
from memlearner_client.ui_workflow import to_api

import host
import tiny_models

sys.path.insert(0, str(host.ROOT / "workflows"))
import ui_format  # noqa: E402

import build  # noqa: E402

CLIENT = Path(sys.executable).parent / "memlearner-client"


def write(tmp_path: Path, graph: dict, name: str = "workflow.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(graph))
    return str(path)


def run_client(server, tmp_path: Path, graph: dict, *args: str) -> list[str]:
    """The argv of a run of ``graph`` against the test server, files into ``tmp_path/out``."""
    return [write(tmp_path, graph), "--server", server.url, "--out", str(tmp_path / "out"), "--timeout", "300", *args]


def posted(server, stderr: str) -> dict:
    """The graph ComfyUI actually received, from its history (the client prints the prompt id on stderr)."""
    prompt_id = re.search(r"queued prompt (\S+)", stderr).group(1)
    return server.get(f"/history/{prompt_id}")[prompt_id]["prompt"][2]


@pytest.fixture(scope="module")
def query_run(server, tmp_path_factory):
    """One end-to-end run of the tiny query-memory workflow with ``--set seed=5``, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("client_query")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(run_client(server, tmp, build.query_memory(tiny=True), "--set", "seed=5"))
    return SimpleNamespace(rc=rc, out=out.getvalue(), err=err.getvalue(), dir=tmp / "out")


# --- named inputs (no server) -----------------------------------------------------------------------------------

def test_set_values_are_json_when_they_parse_and_text_inputs_stay_text():
    graph, uploads = apply_sets(build.memory_rollout(), ["Guider.cfg=4.5", "prompt=42", "Camera path.camera=1",
                                                         'trajectory={"distance": 2.0}'])
    node = graph["camera"]["inputs"]
    assert graph["guider"]["inputs"]["cfg"] == 4.5 and graph["pos"]["inputs"]["text"] == "42" and node["camera"] == "1"
    assert node["trajectory"] == '{"distance": 2.0}' and uploads == []


def test_unknown_input_name_exits_2_listing_the_settable_names(tmp_path, capsys):
    rc = main([write(tmp_path, build.query_memory(tiny=True)), "--server", f"http://127.0.0.1:{host.free_port()}",
               "--set", "steps=4"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown input name 'steps'" in err
    assert "First chunk.steps" in err and "chunk2.steps" in err and "seed " in err


def test_prompt_alias_on_a_tiny_graph_exits_2_naming_the_problem(tmp_path, capsys):
    rc = main([write(tmp_path, build.query_memory(tiny=True)), "--set", "prompt=a fountain"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot set 'prompt'" in err and 'titled "Prompt"' in err and "has no text" in err


def test_missing_or_non_json_workflow_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "missing.json")]) == 2
    assert "cannot read workflow" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert main([str(tmp_path / "bad.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_unreachable_server_exits_1_in_one_line(tmp_path, capsys):
    rc = main([write(tmp_path, build.query_memory(tiny=True)), "--server", f"http://127.0.0.1:{host.free_port()}"])
    err = capsys.readouterr().err
    assert rc == 1 and "cannot reach ComfyUI at http://127.0.0.1:" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_client_imports_neither_comfyui_nor_torch():
    code = "import sys, memlearner_client.cli; print(sorted({'torch', 'comfy', 'folder_paths'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_installed_entry_point_lists_the_inputs_of_a_workflow(tmp_path):
    res = subprocess.run([str(CLIENT), write(tmp_path, build.query_memory()), "--list-inputs"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    names = res.stdout
    assert "prompt" in names and "Prompt.text" in names and "First chunk.seed" in names and "chunk2.seed" in names


# --- against the real server ------------------------------------------------------------------------------------

@pytest.mark.server
def test_query_memory_workflow_runs_and_downloads_its_videos(query_run):
    assert query_run.rc == 0, query_run.err
    saved = [Path(line) for line in query_run.out.splitlines()]
    assert len(saved) == 2 and all(p.is_file() and p.stat().st_size > 0 for p in saved)
    assert all(p.parent == query_run.dir / "memlearner" for p in saved)  # the subfolder is kept


@pytest.mark.server
def test_seed_alias_sets_every_sampler_keeping_their_offsets(server, query_run):
    graph = posted(server, query_run.err)
    assert [graph[n]["inputs"]["seed"] for n in ("chunk1", "chunk2")] == [5, 6]  # built as 42 and 43


@pytest.mark.server
def test_title_addressing_sets_memory_rollout_chunks(server, tmp_path, capsys):
    rc = main(run_client(server, tmp_path, build.memory_rollout(tiny=True), "--set", "Memory Rollout.chunks=2"))
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert posted(server, err)["rollout"]["inputs"]["chunks"] == 2
    assert [Path(p).stat().st_size > 0 for p in out.splitlines()] == [True]


@pytest.mark.server
def test_reference_video_is_uploaded_and_the_dit_mem_workflow_runs(server, tmp_path, capsys):
    clip = tmp_path / "client_reference.mp4"
    tiny_models.write_video(clip, 3, frames=6, size=64)
    rc = main(run_client(server, tmp_path, build.dit_mem_reference(tiny=True), "--set", f"reference_video={clip}"))
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert (server.output_dir.parent / "input" / clip.name).read_bytes() == clip.read_bytes()
    assert posted(server, err)["reference"]["inputs"]["file"] == clip.name
    assert out.strip() and Path(out.split()[0]).stat().st_size > 0


@pytest.mark.server
def test_node_validation_error_exits_1_naming_the_node(server, tmp_path, capsys):
    rc = main(run_client(server, tmp_path, build.query_memory(tiny=True), "--set", "unet.unet_name=missing.safetensors"))
    err = capsys.readouterr().err
    assert rc == 1 and "ComfyUI refused the workflow" in err
    assert "node unet (UNETLoader)" in err and "missing.safetensors" in err


@pytest.mark.server
def test_execution_error_exits_1_with_the_node_and_message(server, tmp_path, capsys):
    one_pose = "[[1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0]]"  # valid JSON, too short for the video: found when it runs
    rc = main(run_client(server, tmp_path, build.memory_rollout(tiny=True), "--set", "Camera path.camera=custom JSON",
                         "--set", f"trajectory={one_pose}"))
    err = capsys.readouterr().err
    assert rc == 1 and 'ComfyUI failed in node rollout (MemLearnerRollout, "Memory Rollout")' in err
    assert "1 poses but the video needs 6" in err


@pytest.mark.server
def test_a_widget_mistake_is_refused_when_queued(server, tmp_path, capsys):
    rc = main(run_client(server, tmp_path, build.memory_rollout(tiny=True), "--set", "trajectory={not json"))
    err = capsys.readouterr().err
    assert rc == 1 and "ComfyUI refused the workflow" in err
    assert 'node camera (MemLearnerCameraPath, "Camera path")' in err and "not valid JSON" in err


@pytest.mark.server
def test_a_mistake_that_comfyui_repeats_under_each_input_is_said_once(server, tmp_path, capsys):
    rc = main(run_client(server, tmp_path, build.memory_rollout(tiny=True), "--set", "rollout.policy=recent",
                         "--set", "rollout.context_frames=0"))
    err = capsys.readouterr().err
    assert rc == 1 and "ComfyUI refused the workflow" in err
    lines = [line for line in err.splitlines() if line.startswith("  node rollout")]
    assert len(lines) == 1 and "context_frames" in lines[0] and "input_types" not in err, err


@pytest.mark.server
@pytest.mark.parametrize("sigint", ["default", "ignored"])  # ignored: started in the background of a script
def test_sigterm_cancels_the_running_prompt_like_ctrl_c(server, tmp_path, sigint):
    import signal
    import threading
    import time

    graph = build.memory_rollout(tiny=True)
    graph["rollout"]["inputs"]["chunks"] = 200  # minutes of work: still running when terminated
    graph["sigmas"]["inputs"]["steps"] = 20
    deadline = time.time() + 120
    while time.time() < deadline and (server.get("/queue")["queue_running"] or server.get("/queue")["queue_pending"]):
        time.sleep(0.2)  # the running prompt seen below must be this client's
    disposition = signal.SIG_IGN if sigint == "ignored" else signal.SIG_DFL
    proc = subprocess.Popen([str(CLIENT), *run_client(server, tmp_path, graph)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, disposition))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    deadline, prompt_id = time.time() + 120, None
    while time.time() < deadline and prompt_id is None:  # the client knows its prompt id, the server runs it
        queued = re.search(r"queued prompt (\S+)", "".join(lines))
        running = [item[1] for item in server.get("/queue")["queue_running"]]
        prompt_id = queued.group(1) if queued and queued.group(1) in running else None
        time.sleep(0.2)
    try:
        assert prompt_id, "the client's prompt never started running"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        reader.join(timeout=10)
        err = "".join(lines)
        assert proc.returncode == 130, err
        # The client confirmed through /queue that its prompt stopped, re-sending the interrupt if the first one
        # landed before the server started executing it (ComfyUI clears the flag then).
        assert f"interrupted (prompt {prompt_id} cancelled on the server)" in err, err
        queue = server.get("/queue")
        held = [item[1] for key in ("queue_running", "queue_pending") for item in queue[key]]
        assert prompt_id not in held, f"the prompt kept running on the server: /queue {held}; client said {err}"
    finally:  # never leave the long rollout to the tests after this one
        proc.kill()
        server.post("/queue", {"clear": True})
        server.post("/interrupt", {})


# --- every output kind ------------------------------------------------------------------------------------------

def latent_graph(seed: int = 1) -> dict:
    """The tiny Wan2.1 sampling an empty video latent, saved with SaveLatent (a ``latents`` output, no video)."""
    g = build.base(build.TINY, tiny=True)
    build.sampler(g, build.TINY, "sample", "unet", seed, title="Sampler")
    g["save"] = build.node("SaveLatent", "Save latent", samples=["sample", 0], filename_prefix="client_latents/tiny")
    return g


def test_output_files_are_every_list_of_filename_dicts_whatever_the_key():
    f = {"filename": "a.bin", "subfolder": "s", "type": "output"}
    node_out = {"images": [f], "latents": [dict(f, filename="b.latent")], "3d": [dict(f, filename="c.glb")],
                "text": ["not a file"], "animated": [True], "video_info": {"filename": "x"}, "bad": [{"filename": 3}]}
    assert [x["filename"] for x in output_files(node_out)] == ["a.bin", "b.latent", "c.glb"]


@pytest.mark.server
def test_save_latent_outputs_are_downloaded(server, tmp_path, capsys):
    rc = main(run_client(server, tmp_path, latent_graph()))
    out, err = capsys.readouterr()
    assert rc == 0, err
    saved = [Path(line) for line in out.splitlines()]
    assert len(saved) == 1 and saved[0].suffix == ".latent" and saved[0].parent == tmp_path / "out" / "client_latents"
    assert saved[0].read_bytes() == next((server.output_dir / "client_latents").glob(saved[0].name)).read_bytes()
    assert "saved no files" not in err


# --- UI-format workflows ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def same_graph(api: dict, converted: dict, object_info: dict) -> None:
    """``converted`` (node ids 1..N, as build's to_ui numbers them in the API graph's order) is ``api``; an input the
    API graph leaves out may be there with the node's default (to_ui writes a widget value for every input)."""
    ids = {str(i + 1): nid for i, nid in enumerate(api)}
    assert set(converted) == set(ids)
    for cid, n in converted.items():
        inputs = {k: [ids[v[0]], v[1]] if isinstance(v, list) else v for k, v in n["inputs"].items()}
        want = api[ids[cid]]
        defaults = {name: ui_format.default_value(kind, opts) for name, kind, opts
                    in ui_format.input_specs(object_info[n["class_type"]]) if kind in ui_format.WIDGET_TYPES}
        for k in [k for k in inputs if k not in want["inputs"] and k in defaults]:
            assert inputs.pop(k) == defaults[k], (cid, k)
        assert (n["class_type"], inputs, n.get("_meta")) == (want["class_type"], want["inputs"], want.get("_meta")), cid


@pytest.mark.server
@pytest.mark.parametrize("name", sorted(p.stem for p in (host.ROOT / "example_workflows").glob("*.json")))
def test_shipped_ui_workflow_converts_to_the_shipped_api_one(object_info, name):
    ui = json.loads((host.ROOT / "example_workflows" / f"{name}.json").read_text())
    api = json.loads((host.ROOT / "workflows" / "api" / f"{name}.json").read_text())
    same_graph(api, to_api(ui, object_info), object_info)


@pytest.mark.server
def test_ui_conversion_drops_notes_and_muted_nodes_and_resolves_reroutes_bypasses_and_primitives(object_info):
    api = latent_graph()
    ui = ui_format.to_ui(api, object_info, ["a note"])
    nodes = {n["type"]: n for n in ui["nodes"]}
    links = {link[0]: link for link in ui["links"]}
    sampler, save = nodes["KSampler"], nodes["SaveLatent"]
    # the model through a Reroute; the sampler's seed from a PrimitiveNode; its latent through a bypassed node
    model_link = next(s["link"] for s in sampler["inputs"] if s["name"] == "model")
    reroute = {"id": 90, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 91}],
               "outputs": [{"name": "", "type": "MODEL", "links": [model_link]}]}
    links[91] = [91, links[model_link][1], 0, 90, 0, "MODEL"]
    links[model_link] = [model_link, 90, 0, sampler["id"], 0, "MODEL"]
    prim = {"id": 92, "type": "PrimitiveNode", "mode": 0, "inputs": [], "outputs": [{"name": "INT", "type": "INT"}],
            "widgets_values": [777, "fixed"]}
    links[93] = [93, 92, 0, sampler["id"], 9, "INT"]
    sampler["inputs"].append({"name": "seed", "type": "INT", "link": 93, "widget": {"name": "seed"}})
    latent_link = next(s["link"] for s in sampler["inputs"] if s["name"] == "latent_image")
    empty_id = links[latent_link][1]
    bypassed = {"id": 94, "type": "LatentUpscaleBy", "mode": 4, "widgets_values": ["nearest-exact", 2.0],
                "inputs": [{"name": "samples", "type": "LATENT", "link": 95}],
                "outputs": [{"name": "LATENT", "type": "LATENT", "links": [latent_link]}]}
    links[95] = [95, empty_id, 0, 94, 0, "LATENT"]
    links[latent_link] = [latent_link, 94, 0, sampler["id"], 3, "LATENT"]
    muted = dict(save, id=96, mode=2, title="Muted save")
    ui["nodes"] += [reroute, prim, bypassed, muted]
    ui["links"] = list(links.values())
    graph = to_api(ui, object_info)
    assert sorted(n["class_type"] for n in graph.values()) == sorted(n["class_type"] for n in api.values())
    s = graph[str(sampler["id"])]["inputs"]
    assert s["model"] == [str(nodes["UNETLoader"]["id"]), 0] and s["latent_image"] == [str(empty_id), 0]
    assert s["seed"] == 777 and s["steps"] == api["sample"]["inputs"]["steps"]


def test_ui_workflow_with_subgraphs_is_refused_in_one_line_with_the_fix(tmp_path, capsys):
    ui = {"nodes": [{"id": 1, "type": "0c1f-sub", "mode": 0}], "links": [],
          "definitions": {"subgraphs": [{"id": "0c1f-sub"}]}}
    server, requests = fake_server({"object_info": {}})
    with server:
        rc = main([write(tmp_path, ui), "--server", server.url])
    err = capsys.readouterr().err
    assert rc == 2 and "uses subgraphs" in err and "Save (API)" in err and len(err.strip().splitlines()) == 1


@pytest.mark.server
def test_ui_format_workflow_runs_on_the_server(server, object_info, tmp_path, capsys):
    ui = ui_format.to_ui(latent_graph(seed=3), object_info, ["a note"])
    rc = main(run_client(server, tmp_path, ui, "--set", "seed=8"))
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "converted UI-format" in err and [Path(p).suffix for p in out.splitlines()] == [".latent"]
    graph = posted(server, err)
    assert [n["inputs"]["seed"] for n in graph.values() if n["class_type"] == "KSampler"] == [8]


# --- auth headers -----------------------------------------------------------------------------------------------

class FakeServer:
    """A ComfyUI stand-in on a thread: records each request's path and headers; runs any prompt at once."""

    def __init__(self, app: web.Application):
        self.app, self.loop = app, asyncio.new_event_loop()
        self.port = host.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        self.runner = web.AppRunner(self.app)
        asyncio.run_coroutine_threadsafe(self.runner.setup(), self.loop).result(10)
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        asyncio.run_coroutine_threadsafe(site.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def fake_server(answers: dict, status: int = 200) -> tuple[FakeServer, list]:
    """``answers``: ``object_info`` (its /object_info, default ``FAKE_INFO``); to make it lie or report more, the
    body of ``/history`` and ``(status, body)`` of ``/prompt`` under those keys, ``/view`` (a handler), and ``ws``,
    websocket messages sent before the done message. Runs any prompt at once; every request is recorded as (path, headers)."""
    requests, queued = [], {}
    done = asyncio.Event()

    @web.middleware
    async def record(request, handler):
        requests.append((request.path, dict(request.headers)))
        if status != 200:
            raise web.HTTPUnauthorized() if status == 401 else web.HTTPException()
        return await handler(request)

    async def ws(request):
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        await done.wait()
        for m in answers.get("ws", []):
            await sock.send_json(m)
        await sock.send_json({"type": "executing", "data": {"node": None, "prompt_id": "p1"}})
        await sock.close()
        return sock

    async def prompt(request):
        queued["prompt"] = (await request.json())["prompt"]
        done.set()
        code, body = answers.get("/prompt", (200, {"prompt_id": "p1", "number": 0, "node_errors": {}}))
        return web.json_response(body, status=code)

    async def history(request):
        files = [{"filename": "a.latent", "subfolder": "latents", "type": "output"}]
        return web.json_response(answers.get("/history", {"p1": {"prompt": [0, "p1", queued.get("prompt")],
                                                                 "outputs": {"9": {"latents": files}}}}))

    async def view(request):
        if "/view" in answers:
            return await answers["/view"](request)
        return web.Response(body=b"latent bytes")

    async def object_info(request):
        return web.json_response(answers.get("object_info", FAKE_INFO))

    app = web.Application(middlewares=[record])
    app.router.add_get("/ws", ws)
    app.router.add_post("/prompt", prompt)
    app.router.add_get("/history/{pid}", history)
    app.router.add_get("/view", view)
    app.router.add_get("/object_info", object_info)
    server = FakeServer(app)
    server.queued = queued
    return server, requests


FAKE_INFO = {"SaveLatent": {"input": {"required": {"samples": ["LATENT"], "filename_prefix": ["STRING", {}]}},
                            "input_order": {"required": ["samples", "filename_prefix"]}}}
FAKE_UI = {"nodes": [{"id": 9, "type": "SaveLatent", "mode": 0, "inputs": [{"name": "samples", "type": "LATENT",
                                                                            "link": None}],
                      "widgets_values": ["client/x"]}], "links": []}


def test_token_and_headers_go_with_every_request_the_websocket_included(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEMLEARNER_CLIENT_TOKEN", "env-secret")
    server, requests = fake_server({"object_info": FAKE_INFO})
    with server:
        rc = main([write(tmp_path, FAKE_UI), "--server", server.url, "--out", str(tmp_path / "out"),
                   "--token", "flag-secret", "--header", "X-Api-Key: key-secret", "--header", "X-Team:blue"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert (tmp_path / "out" / "latents" / "a.latent").read_bytes() == b"latent bytes"
    assert server.queued["prompt"] == {"9": {"class_type": "SaveLatent", "inputs": {"filename_prefix": "client/x"}}}
    paths = [p for p, _ in requests]
    assert {"/object_info", "/ws", "/prompt", "/history/p1", "/view"} <= set(paths)
    for path, headers in requests:
        assert headers.get("Authorization") == "Bearer flag-secret", path  # the flag wins over the environment
        assert headers.get("X-Api-Key") == "key-secret" and headers.get("X-Team") == "blue", path
    assert "secret" not in out + err


def test_token_from_the_environment_and_a_refusal_exits_1_without_printing_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEMLEARNER_CLIENT_TOKEN", "env-secret")
    server, requests = fake_server({"object_info": FAKE_INFO}, status=401)
    with server:
        rc = main([write(tmp_path, build.query_memory(tiny=True)), "--server", server.url, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and "401" in err and "--token" in err and len(err.strip().splitlines()) == 1
    assert requests and all(h.get("Authorization") == "Bearer env-secret" for _, h in requests)
    assert "secret" not in err


def test_malformed_header_exits_2_without_echoing_its_value(tmp_path, capsys):
    rc = main([write(tmp_path, build.query_memory(tiny=True)), "--header", "secret-without-colon"])
    err = capsys.readouterr().err
    assert rc == 2 and '"Name: value"' in err and "secret" not in err


# --- cancelling on the server --------------------------------------------------------------------------------

FAKE_API = {"9": {"class_type": "SaveLatent", "inputs": {"filename_prefix": "client/x"}}}


def stubborn_server(interrupts_lost: int) -> tuple[FakeServer, list]:
    """A server whose prompt p1 runs until an interrupt lands; the first ``interrupts_lost`` interrupts are lost
    (as ComfyUI loses one sent before it starts executing the prompt). Records each request's path."""
    requests, state = [], {"interrupts": 0}

    @web.middleware
    async def record(request, handler):
        requests.append(request.path)
        return await handler(request)

    async def ws(request):
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for _ in sock:  # never reports the prompt done; ends when the client hangs up
            pass
        return sock

    async def prompt(request):
        return web.json_response({"prompt_id": "p1", "number": 0, "node_errors": {}})

    async def interrupt(request):
        state["interrupts"] += 1
        return web.Response()

    async def queue(request):
        if request.method == "POST":
            return web.Response()
        running = state["interrupts"] <= interrupts_lost
        return web.json_response({"queue_running": [[0, "p1", {}, {}, []]] if running else [], "queue_pending": []})

    app = web.Application(middlewares=[record])
    app.router.add_get("/ws", ws)
    app.router.add_post("/prompt", prompt)
    app.router.add_post("/interrupt", interrupt)
    app.router.add_route("*", "/queue", queue)
    return FakeServer(app), requests


def test_a_lost_interrupt_is_sent_again_until_the_server_drops_the_prompt(tmp_path, capsys):
    server, requests = stubborn_server(interrupts_lost=2)
    with server:
        rc = main([write(tmp_path, FAKE_API), "--server", server.url, "--out", str(tmp_path), "--timeout", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "(prompt p1 cancelled on the server)" in err, err
    assert requests.count("/interrupt") == 3


def test_a_prompt_that_never_stops_is_reported_as_possibly_still_running(tmp_path, capsys, monkeypatch):
    import memlearner_client.cli as cli

    monkeypatch.setattr(cli, "CANCEL_CONFIRM_S", 1.0)
    server, requests = stubborn_server(interrupts_lost=10**6)
    with server:
        rc = main([write(tmp_path, FAKE_API), "--server", server.url, "--out", str(tmp_path), "--timeout", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "prompt p1 may still be running" in err and f"{server.url}/queue" in err, err
    assert "cancelled on the server" not in err and requests.count("/interrupt") >= 2


# --- what the graph reports ----------------------------------------------------------------------------------

def test_outputs_refused_when_queued_exit_1_after_the_rest_ran(tmp_path, capsys):
    refused = {"7": {"errors": [{"message": "Value not in list", "details": "query_weights: 'typo.safetensors'"}],
                     "dependent_outputs": ["7"], "class_type": "MemLearnerRevisitScore"}}
    server, _ = fake_server({"/prompt": (200, {"prompt_id": "p1", "number": 0, "node_errors": refused})})
    graph = {**FAKE_API, "7": {"class_type": "MemLearnerRevisitScore", "inputs": {}, "_meta": {"title": "Score"}}}
    with server:
        rc = main([write(tmp_path, graph), "--server", server.url, "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert rc == 1, err
    assert "typo.safetensors" in err and 'did not run (7 (MemLearnerRevisitScore, "Score"))' in err
    assert (tmp_path / "out" / "latents" / "a.latent").is_file() and "a.latent" in out  # the rest ran


def test_text_outputs_are_printed_naming_their_node(tmp_path, capsys):
    files = [{"filename": "a.latent", "subfolder": "latents", "type": "output"}]
    texts = ["revisit_psnr 9.22 dB", 3]
    server, _ = fake_server({"/history": {"p1": {"outputs": {"9": {"latents": files, "text": texts}}}}})
    with server:
        rc = main([write(tmp_path, FAKE_API), "--server", server.url, "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert [line for line in out.splitlines() if "(SaveLatent)" in line] == ["9 (SaveLatent): revisit_psnr 9.22 dB"]


# --- a server that lies ----------------------------------------------------------------------------------------

def named_file(name: str, subfolder: str = "latents") -> dict:
    return {"p1": {"outputs": {"9": {"latents": [{"filename": name, "subfolder": subfolder, "type": "output"}]}}}}


LIES = {  # what a broken or hostile server may answer; each must end in one line and exit 1
    "progress_strings": {"ws": [{"type": "progress", "data": {"prompt_id": "p1", "node": "9", "value": "x", "max": "y"}}]},
    "progress_node_list": {"ws": [{"type": "progress", "data": {"prompt_id": "p1", "node": [], "value": 1, "max": 2}}]},
    "executing_node_dict": {"ws": [{"type": "executing", "data": {"prompt_id": "p1", "node": {"a": 1}}}]},
    "error_fields_lists": {"ws": [{"type": "execution_error", "data": {"prompt_id": "p1", "node_id": [],
                                                                       "exception_message": ["x"]}}]},
    "history_list": {"/history": []},
    "history_entry_list": {"/history": {"p1": []}},
    "history_outputs_list": {"/history": {"p1": {"outputs": []}}},
    "history_text_dict": {"/history": {"p1": {"outputs": {"9": {"text": {"a": 1}}}}}},
    "name_with_nul": {"/history": named_file("a\x00b.latent")},
    "name_url_encoded_dots": {"/history": named_file("%2e%2e")},
    "subfolder_url_encoded_dots": {"/history": named_file("a.latent", "%2e%2e/%2e%2e")},
    "name_dot": {"/history": named_file(".")},
    "prompt_400_error_number": {"/prompt": (400, {"error": 5, "node_errors": []})},
    "prompt_400_message_list": {"/prompt": (400, {"error": {"message": ["x"]}, "node_errors": {"9": "bad"}})},
    "prompt_400_errors_not_dicts": {"/prompt": (400, {"error": "bad", "node_errors": {"9": {"errors": ["x", 3]}}})},
    "prompt_400_list": {"/prompt": (400, ["x"])},
    "prompt_200_node_errors_list": {"/prompt": (200, {"prompt_id": "p1", "node_errors": ["x"]})},
    "prompt_id_number": {"/prompt": (200, {"prompt_id": 5})},
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_a_server_that_lies_gets_one_line_and_no_file_outside_out(tmp_path, capsys, lie):
    server, _ = fake_server(LIES[lie])
    with server:
        rc = main([write(tmp_path, FAKE_API), "--server", server.url, "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    assert {p.name for p in tmp_path.iterdir()} <= {"workflow.json", "out"}  # nothing written beside --out
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()] if (tmp_path / "out").exists() else []
    assert all(p.name == "a.latent" and p.parent.name == "latents" for p in written), written
    assert rc in (0, 1), err
    if rc == 1:  # one line, or a refusal's listed lines after it
        assert any(line.startswith("memlearner-client: ") for line in err.splitlines()), err


@pytest.mark.parametrize("info", [["SaveLatent"], {"SaveLatent": "node"}, {"SaveLatent": {"input": []}},
                                  {"SaveLatent": {"input": {"required": {"filename_prefix": "STRING"}}}}])
def test_object_info_of_the_wrong_shape_gets_one_line(tmp_path, capsys, info):
    server, _ = fake_server({"object_info": info})
    with server:
        rc = main([write(tmp_path, FAKE_UI), "--server", server.url, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "Traceback" not in err and rc in (0, 1), err
    if rc == 1:  # one line, or a refusal's listed lines after it
        assert any(line.startswith("memlearner-client: ") for line in err.splitlines()), err


# --- downloads: whole files only, never through a link -------------------------------------------------------

async def cut_off_view(request):
    """Promises 1000 bytes, sends 12, drops the connection."""
    response = web.StreamResponse(headers={"Content-Length": "1000"})
    await response.prepare(request)
    await response.write(b"latent bytes")
    request.transport.close()
    return response


def test_a_download_cut_off_leaves_no_file_and_exits_with_one_line(tmp_path, capsys):
    server, _ = fake_server({"/view": cut_off_view})
    with server:
        rc = main([write(tmp_path, FAKE_UI), "--server", server.url, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err
    assert [p.name for p in (tmp_path / "out").rglob("*") if p.is_file()] == []  # no half file, no .part left


def test_a_link_planted_at_a_downloads_name_is_replaced_not_written_through(tmp_path, capsys):
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"untouched")
    (tmp_path / "out" / "latents").mkdir(parents=True)
    os.symlink(outside, tmp_path / "out" / "latents" / "a.latent")
    server, _ = fake_server({})
    with server:
        rc = main([write(tmp_path, FAKE_UI), "--server", server.url, "--out", str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    dest = tmp_path / "out" / "latents" / "a.latent"
    assert not dest.is_symlink() and dest.read_bytes() == b"latent bytes" and outside.read_bytes() == b"untouched"
