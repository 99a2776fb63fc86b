"""Every pack node checks each input against its own schema when it runs: an API prompt skips some of ComfyUI's
queue-time checks (the inputs a node's ``validate_inputs`` names, V3 combos on 0.3.75, the type of what is linked
to a socket), and the node must still refuse in one line naming the input, before anything runs."""

import math
import sys

import pytest

import host

sys.path.insert(0, str(host.ROOT / "workflows"))
import build  # noqa: E402

SOCKET_TYPES = ("LATENT", "IMAGE", "MASK", "SIGMAS", "NOISE", "GUIDER", "SAMPLER", "MODEL", "VAE", "CLIP",
                "CONDITIONING", "MEMLEARNER_CAMERA_PATH")


def pack_nodes(comfy) -> dict:
    return {name: cls for name, cls in comfy.nodes.NODE_CLASS_MAPPINGS.items()
            if name.startswith("MemLearner") and not name.startswith("MemLearnerTest")}


def wrong_values(kind: str, spec: dict) -> list:
    """Values an input of this kind must refuse: the wrong type, non-finite, just outside the range, no choice."""
    if kind == "INT":
        out = ["5", 1.5, True]
        out += [spec["min"] - 1] if spec.get("min") is not None else []
        return out + ([spec["max"] + 1] if spec.get("max") is not None else [])
    if kind == "FLOAT":
        out = ["0.5", math.nan, math.inf]
        out += [spec["min"] - 1.0] if spec.get("min") is not None else []
        return out + ([spec["max"] + 1.0] if spec.get("max") is not None else [])
    return {"BOOLEAN": ["yes", 1], "STRING": [5, ["a"]], "COMBO": ["no such choice"]}.get(
        kind, ["a string", {"samples": None}] if kind in SOCKET_TYPES else [])


def cases(comfy):
    for name, cls in sorted(pack_nodes(comfy).items()):
        for inp in cls.define_schema().inputs:
            kind, spec = host.pack("nodes.input_checks").input_kind(inp), inp.as_dict()
            if kind == "COMBO" and not spec.get("options"):
                continue  # a file list that is empty in the test folders: nothing to choose from
            for value in wrong_values(kind, spec):
                yield name, cls, inp.id, value


def test_every_input_of_every_pack_node_refuses_a_wrong_value_naming_itself(comfy):
    checked = 0
    for name, cls, input_id, value in cases(comfy):
        with pytest.raises(ValueError, match=rf"input {input_id} ") as refused:
            host.run_node(cls, **{input_id: value})
        assert "\n" not in str(refused.value) and len(str(refused.value)) < 600, (name, input_id, str(refused.value))
        checked += 1
    assert checked > 100  # every node, every widget and socket


def test_declared_defaults_pass_the_checks(comfy):
    checks = host.pack("nodes.input_checks")
    for cls in pack_nodes(comfy).values():
        defaults = {i.id: i.as_dict()["default"] for i in cls.define_schema().inputs if "default" in i.as_dict()}
        checks.check_inputs(cls, defaults)


@pytest.mark.server
@pytest.mark.parametrize("change, said", [
    (("rollout", "chunks", 5000), "chunks"), (("rollout", "policy", "everything"), "policy"),
    (("rollout", "guider", ["chunk", 0]), "input guider takes a GUIDER"),
    (("rollout", "camera_path", ["chunk", 0]), "input camera_path takes a camera path")])
def test_an_api_prompt_that_skips_the_frontend_is_refused_naming_the_input(server, change, said):
    node, name, value = change
    graph = build.memory_rollout(tiny=True)
    graph[node]["inputs"][name] = value
    with pytest.raises(AssertionError) as failed:
        server.run_prompt(graph)
    assert said in str(failed.value), str(failed.value)[:2000]


@pytest.mark.parametrize("folder, what", [("memory_encoders", "encoder_name"), ("memlearner", "query_weights")])
def test_a_model_file_gone_when_the_node_runs_is_one_line_listing_the_files_there(comfy, folder, what):
    ca = host.pack("nodes.comfy_adapter")
    there = comfy.folder_paths.get_filename_list(folder)
    with pytest.raises(ValueError) as e:
        ca.model_file(folder, "typo.safetensors", what)
    message = str(e.value)
    assert message.startswith(f"{what}: no file 'typo.safetensors' in ComfyUI's models/{folder} folder")
    assert there and all(repr(name) in message for name in there[:12]) and "\n" not in message


def queued_errors(server, workflow, node: str, name: str, value) -> list:
    graph = workflow(tiny=True)
    graph[node]["inputs"][name] = value
    status, body = server.post("/prompt", {"prompt": graph})
    assert status == 400, body
    return body["node_errors"][node]["errors"]


@pytest.mark.server
@pytest.mark.parametrize("workflow, node, name", [
    (build.dit_mem_reference, "encoder", "encoder_name"), (build.dit_mem_reference, "encoder", "dtype"),
    (build.revisit_world, "world", "path"), (build.dit_mem_reference, "memory", "resize"),
])
def test_a_wrong_choice_is_refused_when_queued_once_under_its_own_name_listing_the_choices(server, workflow, node,
                                                                                          name):
    """On every host, 0.3.75 included (it checks only combos declared as their list of choices)."""
    graph = workflow(tiny=True)
    errors = queued_errors(server, workflow, node, name, "typo.safetensors")
    assert len(errors) == 1 and errors[0]["extra_info"]["input_name"] == name, errors
    assert errors[0]["type"] == "value_not_in_list" and "typo.safetensors" in errors[0]["details"]
    info = server.get("/object_info")[graph[node]["class_type"]]["input"]
    spec = {**info["required"], **info.get("optional", {})}[name]
    choices = spec[0] if isinstance(spec[0], list) else spec[1]["options"]
    assert all(str(c) in errors[0]["details"] for c in choices[:20]), errors[0]["details"]


@pytest.mark.server
@pytest.mark.parametrize("value, kind", [(5000, "value_bigger_than_max"), (0, "value_smaller_than_min")])
def test_chunks_out_of_range_is_refused_when_queued_once_under_its_name(server, value, kind):
    errors = queued_errors(server, build.memory_rollout, "rollout", "chunks", value)
    assert [(e["type"], e["extra_info"]["input_name"]) for e in errors] == [(kind, "chunks")], errors
