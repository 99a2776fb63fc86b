"""memlearner-client, the headless client: named inputs, then the tiny workflows through the real ComfyUI server."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from memlearner_client.cli import apply_sets, main

import host
import tiny_models

sys.path.insert(0, str(host.ROOT / "workflows"))
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
    graph, uploads = apply_sets(build.memory_rollout(), ["Memory Rollout.cfg=4.5", "prompt=42", "Memory Rollout.camera=1",
                                                         'trajectory={"distance": 2.0}'])
    node = graph["rollout"]["inputs"]
    assert node["cfg"] == 4.5 and graph["pos"]["inputs"]["text"] == "42" and node["camera"] == "1"
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
    rc = main(run_client(server, tmp_path, build.memory_rollout(tiny=True), "--set", "trajectory={not json"))
    err = capsys.readouterr().err
    assert rc == 1 and 'ComfyUI failed in node rollout (MemLearnerMemoryRollout, "Memory Rollout")' in err
    assert "not valid JSON" in err


@pytest.mark.server
def test_sigterm_cancels_the_running_prompt_like_ctrl_c(server, tmp_path):
    import signal
    import time

    graph = build.memory_rollout(tiny=True)
    graph["rollout"]["inputs"].update(chunks=200, steps=20)  # minutes of work: still running when terminated
    proc = subprocess.Popen([str(CLIENT), *run_client(server, tmp_path, graph)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline, prompt_id = time.time() + 120, None
    while time.time() < deadline and prompt_id is None:
        queue = server.get("/queue")
        running = [item[1] for item in queue["queue_running"]]
        prompt_id = running[0] if running else None
        time.sleep(0.2)
    try:
        assert prompt_id, "the client's prompt never started running"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "interrupted" in err
        deadline = time.time() + 60
        while time.time() < deadline and server.get("/queue")["queue_running"]:
            time.sleep(0.2)
        assert not server.get("/queue")["queue_running"], "the prompt kept running on the server"
    finally:  # never leave the long rollout to the tests after this one
        proc.kill()
        server.post("/queue", {"clear": True})
        server.post("/interrupt", {})
