"""``memlearner-client``: run a MemLearner workflow on a ComfyUI server from the command line.

Why: the memory workflows run for minutes to hours on a GPU machine; this client drives any ComfyUI it can reach
(a remote one too) without a browser. It sets the workflow's named inputs (prompt, seed, reference video, any
``Title.input``), queues the graph, shows progress from ComfyUI's websocket and downloads the saved files. It
needs only aiohttp and tqdm: no ComfyUI, no torch on the machine that runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import re
import signal
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from urllib.parse import unquote

import aiohttp
from tqdm import tqdm

from .errors import Fail
from .ui_workflow import is_ui_format, to_api

# alias -> (title of the node, or None for every node; the inputs it sets)
ALIASES = {
    "prompt": ("Prompt", ("text",)),
    "negative": ("Negative prompt", ("text",)),
    "seed": (None, ("seed", "noise_seed")),
    "trajectory": (None, ("trajectory",)),
    "reference_video": ("Reference video", ("file",)),
}
RAW = {"prompt", "negative", "trajectory"}  # text inputs: VALUE is never parsed as JSON
UPLOAD = {"reference_video"}  # VALUE is a local file, uploaded to ComfyUI's input folder first
PROG = "memlearner-client"
TOKEN_ENV = "MEMLEARNER_CLIENT_TOKEN"
# what reading JSON of a shape ComfyUI never sends raises (a lying or broken server)
SHAPE_ERRORS = (TypeError, AttributeError, KeyError, IndexError, ValueError)
CANCEL_CONFIRM_S = 30.0  # how long a cancel re-sends interrupts until /queue no longer lists the prompt
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


# --- the graph and its named inputs (pure) -------------------------------------------------------------------

def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def title(node: dict) -> str | None:
    return (node.get("_meta") or {}).get("title")


def describe(graph: dict, node_id: str) -> str:
    node_id = quoted(node_id, 80)
    node = graph.get(node_id) or {}
    t = title(node)
    return f"{node_id} ({node.get('class_type', '?')}" + (f', "{t}")' if t and t != node_id else ")")


def read_workflow(path: str):
    """The parsed JSON of a workflow file; a clear ``Fail`` (exit 2) when it cannot be read or parsed."""
    try:
        return json.loads(Path(path).read_bytes())
    except OSError as e:
        raise Fail(f"cannot read workflow {path}: {e.strerror or e}", 2) from None
    except ValueError as e:
        raise Fail(f"workflow {path} is not valid JSON: {e}", 2) from None


def check_api(graph, path: str) -> dict:
    if not (isinstance(graph, dict) and graph and all(
            isinstance(n, dict) and "class_type" in n and isinstance(n.get("inputs"), dict) for n in graph.values())):
        raise Fail(f"{path} is neither an API-format ComfyUI workflow (node_id -> {{class_type, inputs}}) nor a "
                   "UI-format one (nodes and links)", 2)
    return graph


def load(path: str) -> dict:
    """An API-format graph from a file; a clear ``Fail`` (exit 2) for anything else (UI format: ``load_any``)."""
    return check_api(read_workflow(path), path)


def load_any(path: str, base: str, headers: dict[str, str]) -> dict:
    """An API-format graph from an API- or UI-format file; UI format is converted with the server's
    ``/object_info`` (the server is asked only then)."""
    data = read_workflow(path)
    if not is_ui_format(data):
        return check_api(data, path)

    async def object_info() -> dict:
        with talking_to(base):
            async with session(headers) as http, http.get(f"{base}/object_info") as r:
                r.raise_for_status()
                return await r.json()

    info = asyncio.run(object_info())
    if not isinstance(info, dict):
        raise Fail(f"ComfyUI at {base} answered /object_info with {type(info).__name__}, not node definitions")
    try:
        graph = to_api(data, info, path)
    except SHAPE_ERRORS as e:
        raise Fail(f"the node definitions ComfyUI at {base} sent (/object_info) are not in ComfyUI's shape "
                   f"({type(e).__name__}: {quoted(str(e))})") from None
    print(f"converted UI-format {path} with the node definitions of {base}", file=sys.stderr)
    return check_api(graph, path)


def auth_headers(token: str | None, headers: list[str]) -> dict[str, str]:
    """``Authorization: Bearer <token>`` and each ``--header "Name: value"``; an explicit Authorization header wins
    over the token. Messages never repeat a value (it may be a secret)."""
    result = {"Authorization": f"Bearer {token.strip()}"} if token and token.strip() else {}
    if token and any(c in token.strip() for c in "\r\n"):
        raise Fail(f"the token (--token or {TOKEN_ENV}) contains a line break", 2)
    for i, item in enumerate(headers, 1):
        name, colon, value = item.partition(":")
        name, value = name.strip(), value.strip()
        if not colon or not HEADER_NAME.fullmatch(name):
            raise Fail(f'--header number {i}: expected "Name: value" with a header name before the colon', 2)
        if any(c in value for c in "\r\n"):
            raise Fail(f"--header {name}: the value contains a line break", 2)
        for old in [k for k in result if k.lower() == name.lower()]:
            del result[old]
        result[name] = value
    return result


def alias_targets(graph: dict, alias: str) -> list[tuple[str, str]]:
    want, inputs = ALIASES[alias]
    return [(i, k) for i, n in graph.items() if want is None or title(n) == want
            for k in inputs if k in n["inputs"] and not is_link(n["inputs"][k])]


def label(graph: dict, node_id: str, inp: str) -> str:
    """``Title.input`` where the title names this node alone, else ``node_id.input``."""
    t = title(graph[node_id])
    unique = t and t not in graph and sum(title(n) == t for n in graph.values()) == 1
    return f"{t if unique else node_id}.{inp}"


def listing(graph: dict) -> str:
    """Every settable name: the aliases this graph has, then each widget value as Title.input / node_id.input."""
    def show(v) -> str:
        s = json.dumps(v)
        return s if len(s) <= 60 else s[:57] + "..."

    lines = ["aliases:"]
    for alias in ALIASES:
        if targets := alias_targets(graph, alias):
            lines.append(f"  {alias:<16} -> " + ", ".join(label(graph, i, k) for i, k in targets))
    lines.append("inputs (Title.input or node_id.input):")
    for i, n in graph.items():
        for k, v in n["inputs"].items():
            if not is_link(v):
                name = label(graph, i, k)
                alt = f" | {i}.{k}" if not name.startswith(f"{i}.") else ""
                lines.append(f"  {name}{alt} = {show(v)}")
    return "\n".join(lines)


def usage(graph: dict, message: str) -> Fail:
    return Fail(f"{message}\nsettable names (--set NAME=VALUE):\n{listing(graph)}", 2)


def resolve(graph: dict, name: str) -> list[tuple[str, str]]:
    """The (node_id, input) pairs a NAME sets; ``Fail`` (exit 2, with the settable names) when it sets none."""
    if name in ALIASES:
        if targets := alias_targets(graph, name):
            return targets
        want, inputs = ALIASES[name]
        nodes = [i for i, n in graph.items() if title(n) == want]
        if want is None:
            problem = f"no node in this workflow has a {' or '.join(inputs)} input"
        elif not nodes:
            problem = f'this workflow has no node titled "{want}"'
        else:
            have = ", ".join(graph[nodes[0]]["inputs"]) or "none"
            problem = (f'the node titled "{want}", {describe(graph, nodes[0])}, has no {inputs[0]} value to set '
                       f"(its inputs: {have})")
        raise usage(graph, f"cannot set {name!r}: {problem}")
    ref, dot, inp = name.rpartition(".")
    if not dot or not ref or not inp:
        raise usage(graph, f"unknown input name {name!r}: use an alias, Title.input or node_id.input")
    nodes = [i for i, n in graph.items() if ref in (i, title(n))]
    if not nodes:
        raise usage(graph, f"unknown input name {name!r}: no node has the id or title {ref!r}")
    if len(nodes) > 1:
        raise usage(graph, f"{name!r} is ambiguous: {ref!r} names nodes {', '.join(nodes)}; use node_id.{inp}")
    inputs = graph[nodes[0]]["inputs"]
    if inp not in inputs:
        raise usage(graph, f"node {describe(graph, nodes[0])} has no input {inp!r} (its inputs: {', '.join(inputs)})")
    if is_link(inputs[inp]):
        raise usage(graph, f"{name!r} is connected to the output of node {inputs[inp][0]}, not a value to set")
    return [(nodes[0], inp)]


def parse_value(raw: str, current, keep_raw: bool):
    """JSON when it parses (numbers, booleans, objects), else the string; inputs that hold text stay text."""
    if keep_raw or isinstance(current, str):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def apply_sets(graph: dict, sets: list[str]) -> tuple[dict, list[tuple[str, str, Path]]]:
    """A copy of the graph with every ``NAME=VALUE`` applied, and the (node_id, input, local file) uploads that
    must replace their input's value before posting. Raises ``Fail`` (exit 2) without contacting a server."""
    graph = copy.deepcopy(graph)
    uploads = []
    for item in sets:
        name, eq, raw = item.partition("=")
        if not eq:
            raise usage(graph, f"--set {item!r}: expected NAME=VALUE")
        targets = resolve(graph, name.strip())
        if name.strip() in UPLOAD:
            path = Path(raw).expanduser()
            if not path.is_file():
                raise Fail(f"--set {name}: no local file {raw!r} to upload", 2)
            uploads += [(i, k, path) for i, k in targets]
            continue
        values = [parse_value(raw, graph[i]["inputs"][k], name.strip() in RAW) for i, k in targets]
        if name.strip() == "seed":
            values = seeds_keeping_offsets(values[0], [graph[i]["inputs"][k] for i, k in targets])
        for (i, k), value in zip(targets, values, strict=True):
            graph[i]["inputs"][k] = value
    return graph, uploads


def seeds_keeping_offsets(seed, old: list) -> list:
    """``seed`` for the lowest seed of the graph, the others keeping their offset from it (chunk 2 at seed+1
    stays one above chunk 1), so samplers never start from the same noise by accident."""
    if not isinstance(seed, int) or not all(isinstance(s, int) for s in old):
        return [seed] * len(old)
    return [seed + s - min(old) for s in old]


def refusal(body: dict, graph: dict) -> str:
    """ComfyUI's validation answer (``error`` and ``node_errors``) as lines naming each node."""
    def text(e) -> str:
        if not isinstance(e, dict):
            return quoted(e, 500) if e not in (None, "", [], {}) else ""
        return ": ".join(quoted(e[k], 500) for k in ("message", "details") if e.get(k) not in (None, ""))

    def once(e) -> str:
        """ComfyUI repeats a node's own validation message under each input its check reads
        (``"<input> - <message>"``): the message, said once."""
        if isinstance(e, dict) and e.get("type") == "custom_validation_failed" and " - " in str(e.get("details")):
            return quoted(str(e["details"]).split(" - ", 1)[1], 500)
        return text(e)

    lines = ["ComfyUI refused the workflow: " + text(body.get("error"))]
    node_errors = body.get("node_errors")
    for node_id, info in node_errors.items() if isinstance(node_errors, dict) else ():
        errors = info.get("errors") if isinstance(info, dict) else [info]
        said = []
        for e in errors if isinstance(errors, list) else [errors]:
            if once(e) not in said:
                said.append(once(e))
        lines.extend(f"  node {describe(graph, str(node_id))}: {message}" for message in said)
    return "\n".join(lines)


def quoted(text, limit: int = 200) -> str:
    """A server's text as one bounded line (a server may send megabytes, NUL bytes or line breaks)."""
    text = str(text).replace("\x00", "\\0").replace("\r", " ").replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def server_url(server: str) -> str:
    url = (server if "://" in server else f"http://{server}").rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise Fail(f"--server {server!r}: expected an http:// or https:// address", 2)
    return url


# --- talking to ComfyUI ---------------------------------------------------------------------------------------

def session(headers: dict[str, str]) -> aiohttp.ClientSession:
    """An HTTP session sending ``headers`` (auth) on every request, the websocket's included."""
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=30), headers=headers)


@contextlib.contextmanager
def talking_to(base: str):
    """aiohttp's errors as one-line ``Fail`` (exit 1): unreachable, or an HTTP error (401/403 with a hint)."""
    try:
        yield
    except aiohttp.ClientConnectionError as e:  # refused, DNS, connect timeout, dropped connection
        raise Fail(f"cannot reach ComfyUI at {base}: {e}") from None
    except aiohttp.ClientResponseError as e:
        hint = f" (pass a token with --token or {TOKEN_ENV}, or --header)" if e.status in (401, 403) else ""
        raise Fail(f"ComfyUI at {base} answered with an error: {e.status}, {e.message}{hint}") from None
    except aiohttp.ClientError as e:
        raise Fail(f"ComfyUI at {base} answered with an error: {e}") from None
    except SHAPE_ERRORS as e:  # JSON of a shape it never sends
        raise Fail(f"ComfyUI at {base} answered in a shape this client does not understand "
                   f"({type(e).__name__}: {quoted(str(e))})") from None


class Client:
    """One prompt on one server: upload, queue, follow the websocket, download. ``prompt_id`` once queued."""

    def __init__(self, base: str, graph: dict, uploads: list[tuple[str, str, Path]], out: Path,
                 headers: dict[str, str] | None = None):
        self.base, self.graph, self.uploads, self.out = base, graph, uploads, out
        self.headers = headers or {}
        self.client_id = uuid.uuid4().hex
        self.prompt_id: str | None = None
        self.stopped_on_server: bool | None = None  # after a cancel: whether /queue confirmed the prompt gone
        self.refused: list[str] | None = None  # node ids ComfyUI refused when queueing (the rest ran)

    async def run(self) -> list[Path]:
        with talking_to(self.base):
            async with session(self.headers) as http:
                ws_url = "ws" + self.base[len("http"):] + f"/ws?clientId={self.client_id}"
                async with http.ws_connect(ws_url, max_msg_size=0) as ws:  # before posting: no message missed
                    for node_id, inp, path in self.uploads:
                        self.graph[node_id]["inputs"][inp] = await self.upload(http, path)
                    await self.queue(http)
                    try:
                        await self.follow(ws)
                    except asyncio.CancelledError:  # --timeout or Ctrl-C: do not leave our prompt running
                        await self.cancel(http)
                        raise
                async with http.get(f"{self.base}/history/{self.prompt_id}") as r:
                    r.raise_for_status()
                    history = await r.json()
                entry = history.get(self.prompt_id) if isinstance(history, dict) else None
                outputs = entry.get("outputs") if isinstance(entry, dict) else None
                if not isinstance(outputs, dict):
                    raise Fail(f"ComfyUI at {self.base} reported prompt {self.prompt_id} done, but /history has no "
                               f"outputs object for it")
                for line in text_outputs(outputs, self.graph):
                    print(line, flush=True)
                saved = await self.download(http, outputs)
        if self.refused is not None:
            nodes = ", ".join(describe(self.graph, n) for n in self.refused)
            raise Fail(f"the outputs ComfyUI refused did not run ({nodes}); the rest ran and are saved")
        return saved

    async def upload(self, http: aiohttp.ClientSession, path: Path) -> str:
        """POST /upload/image (ComfyUI stores videos through it too); the name the graph should use."""
        with path.open("rb") as f:
            form = aiohttp.FormData()
            form.add_field("image", f, filename=path.name)
            form.add_field("type", "input")
            form.add_field("overwrite", "true")
            async with http.post(f"{self.base}/upload/image", data=form) as r:
                if r.status != 200:
                    raise Fail(f"ComfyUI refused the upload of {path} ({r.status}): {(await r.text())[:500]}")
                body = await r.json()
        name = f"{body['subfolder']}/{body['name']}" if body.get("subfolder") else body["name"]
        print(f"uploaded {path} as {name}", file=sys.stderr)
        return name

    async def queue(self, http: aiohttp.ClientSession) -> None:
        async with http.post(f"{self.base}/prompt", json={"prompt": self.graph, "client_id": self.client_id}) as r:
            text = await r.text()
            try:
                body = json.loads(text)
            except ValueError:
                body = None
            if r.status == 400 and isinstance(body, dict):
                raise Fail(refusal(body, self.graph))
            if r.status != 200 or not isinstance(body, dict) or not isinstance(body.get("prompt_id"), str):
                raise Fail(f"ComfyUI at {self.base} did not queue the workflow ({r.status}): {text[:500]}")
        self.prompt_id = body["prompt_id"]
        if body.get("node_errors"):  # outputs that failed validation are skipped, the others run
            errors = body["node_errors"]
            self.refused = sorted(quoted(k, 80) for k in errors) if isinstance(errors, dict) else ["?"]
            print(refusal({"error": "some outputs will not run", **body}, self.graph), file=sys.stderr)
        print(f"queued prompt {self.prompt_id} on {self.base}", file=sys.stderr)

    async def follow(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Until ComfyUI reports our prompt done: a tqdm bar (stderr) per node that reports progress."""
        bar, node, shown = None, None, None
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:  # binary frames are previews
                    continue
                try:
                    m = json.loads(msg.data)
                    kind, data = m.get("type"), m.get("data") or {}
                except (ValueError, AttributeError):
                    continue
                if not isinstance(data, dict) or data.get("prompt_id") != self.prompt_id:
                    continue
                if kind == "executing":
                    if data.get("node") is None:
                        return
                    shown_as = data.get("display_node") or data["node"]
                    node = shown_as if isinstance(shown_as, str) else node
                elif kind == "progress":
                    node = data.get("node") if isinstance(data.get("node"), str) else node
                    total, value = data.get("max"), data.get("value")
                    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (total, value)):
                        continue  # a progress report without numbers: nothing to show
                    name = title(self.graph.get(node) or {}) or (self.graph.get(node) or {}).get("class_type", node)
                    if bar is None:
                        bar = tqdm(total=total, desc=name, file=sys.stderr, unit="step", dynamic_ncols=True)
                    elif total != bar.total or value < bar.n or node != shown:
                        bar.set_description(name, refresh=False)
                        bar.reset(total=total)
                    shown = node
                    bar.update(value - bar.n)
                elif kind == "execution_error":
                    where = describe(self.graph, str(data.get("node_id")))
                    what = ": ".join(quoted(s, 2000) for s in (data.get("exception_type"), data.get("exception_message"))
                                     if s)
                    raise Fail(f"ComfyUI failed in node {where}: {what.strip()}")
                elif kind == "execution_interrupted":
                    raise Fail(f"prompt {self.prompt_id} was interrupted on the server", 130)
            raise Fail(f"ComfyUI at {self.base} closed the websocket before prompt {self.prompt_id} finished")
        finally:
            if bar is not None:
                bar.close()

    async def cancel(self, http: aiohttp.ClientSession) -> None:
        """Drop our prompt from the queue, or interrupt it if it is the one running (not anyone else's), until
        ``/queue`` no longer holds it. ComfyUI clears its interrupt flag when it starts executing a prompt, so an
        interrupt sent between the prompt leaving the queue and its execution starting is lost: it is sent again
        until the prompt is gone, for at most ``CANCEL_CONFIRM_S``. Sets ``stopped_on_server``."""
        async def drop():
            for path, payload in (("/queue", {"delete": [self.prompt_id]}), ("/interrupt", {"prompt_id": self.prompt_id})):
                async with http.post(self.base + path, json=payload):
                    pass

        if self.prompt_id is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CANCEL_CONFIRM_S
        while True:
            try:
                await asyncio.wait_for(drop(), 5)
                if not await asyncio.wait_for(self.held_by_server(http), 5):
                    self.stopped_on_server = True
                    return
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                pass
            if loop.time() > deadline:
                self.stopped_on_server = False
                return
            await asyncio.sleep(0.5)

    async def held_by_server(self, http: aiohttp.ClientSession) -> bool:
        """Whether ``/queue`` lists our prompt as running or pending (ValueError: an answer of another shape)."""
        async with http.get(f"{self.base}/queue") as r:
            r.raise_for_status()
            body = await r.json()
        if not isinstance(body, dict):
            raise ValueError("/queue is not an object")
        items = [item for key in ("queue_running", "queue_pending") for item in body.get(key) or []]
        return any(isinstance(item, list) and len(item) > 1 and item[1] == self.prompt_id for item in items)

    async def download(self, http: aiohttp.ClientSession, outputs: dict) -> list[Path]:
        """Every file in the history's outputs, through /view, into ``out/<subfolder>/<filename>``."""
        saved, seen = [], set()
        for node_out in outputs.values():
            for f in output_files(node_out):
                params = {"filename": f["filename"], "subfolder": f.get("subfolder") or "",
                          "type": f.get("type") or "output"}
                parts = local_parts(params["subfolder"], params["filename"])
                if parts is None:
                    print(f"skipped a file the server named {quoted(params['subfolder'], 80)!r}/"
                          f"{quoted(params['filename'], 80)!r}: not a plain file name", file=sys.stderr)
                    continue
                if tuple(params.values()) in seen:
                    continue
                seen.add(tuple(params.values()))
                dest = self.out.joinpath(*parts)
                async with http.get(f"{self.base}/view", params=params) as r:
                    r.raise_for_status()
                    tmp = None
                    try:  # a new temporary file, renamed into place once whole: never a half-written file, and a
                        # link already at ``dest`` is replaced, not written through
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
                        with os.fdopen(fd, "wb") as fh:
                            async for chunk in r.content.iter_chunked(1 << 20):
                                fh.write(chunk)
                        os.chmod(tmp, 0o644)
                        os.replace(tmp, dest)
                        tmp = None
                    except aiohttp.ClientError:
                        raise
                    except OSError as e:
                        raise Fail(f"cannot write {dest}: {e.strerror or e}") from None
                    finally:
                        if tmp is not None:
                            Path(tmp).unlink(missing_ok=True)
                print(dest, flush=True)
                saved.append(dest)
        if not saved:
            print(f"prompt {self.prompt_id} finished but saved no files", file=sys.stderr)
        return saved


def local_parts(subfolder: str, filename: str) -> list[str] | None:
    """The path under ``--out`` of a file the server reported, or None unless every part is a plain name: not
    empty, ``.`` or ``..``, no control character, no percent-encoding (``%2e%2e``), the file name without slashes."""
    if "/" in filename or "\\" in filename:
        return None
    parts = [p for p in subfolder.replace("\\", "/").split("/") if p] + [filename]
    if subfolder.startswith(("/", "\\")) or any(
            p in (".", "..") or any(ord(c) < 32 for c in p) or unquote(p) != p for p in parts):
        return None
    return parts


def text_outputs(outputs: dict, graph: dict) -> list[str]:
    """The text a node reported (``{"text": [...]}``, e.g. Revisit Score's PSNR), one ``node: text`` line each."""
    lines = []
    for node_id, node_out in outputs.items() if isinstance(outputs, dict) else ():
        texts = node_out.get("text") if isinstance(node_out, dict) else None
        for text in texts if isinstance(texts, list) else ():
            if isinstance(text, str):
                lines.append(f"{describe(graph, str(node_id))}: {text[:10_000]}".replace("\x00", ""))
    return lines


def output_files(node_out) -> list[dict]:
    """Every file a node reported, whatever the kind (images, gifs, videos, audio, latents, 3d...): ComfyUI lists
    each as ``{filename, subfolder, type}`` in a list under the kind's key."""
    if not isinstance(node_out, dict):
        return []
    return [f for files in node_out.values() if isinstance(files, list) for f in files
            if isinstance(f, dict) and isinstance(f.get("filename"), str) and f["filename"]
            and isinstance(f.get("subfolder", ""), str) and isinstance(f.get("type", ""), str)]


# --- command line ---------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Run a ComfyUI workflow (API format, e.g. workflows/api/*.json, or UI format) on a "
        "ComfyUI server: set named inputs, queue it, follow its progress, download the files it saves.",
        epilog="NAME is Title.input or node_id.input (a node addressed by its _meta.title or its id), or an alias: "
        "prompt (Prompt.text), negative (Negative prompt.text), seed (every seed/noise_seed input), trajectory "
        "(every trajectory input, kept as text), reference_video (a LOCAL file, uploaded to the server's input "
        "folder, then used as Reference video.file). VALUE is parsed as JSON when it parses (numbers, booleans, "
        "objects), else taken as a string; inputs whose current value is text stay text. A --timeout or Ctrl-C "
        "cancels the prompt on the server. Exit codes: 0 done, 1 server or workflow error, 2 bad arguments, "
        "130 interrupted.")
    p.add_argument("workflow", metavar="WORKFLOW.json",
                   help="API-format graph (ComfyUI's 'Save (API)'), or a UI-format workflow (converted with the "
                   "server's node definitions)")
    p.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI address (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="set an input (repeatable)")
    p.add_argument("--out", default="./memlearner_outputs", metavar="DIR",
                   help="where the saved files go, keeping ComfyUI's subfolders (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="give up (and cancel the prompt) after this long (default: %(default)g)")
    p.add_argument("--list-inputs", action="store_true", help="print the settable names and exit")
    p.add_argument("--token", metavar="TOKEN", help=f"send 'Authorization: Bearer TOKEN' with every request, the "
                   f"websocket's included (default: the {TOKEN_ENV} environment variable; never printed)")
    p.add_argument("--header", action="append", default=[], metavar='"NAME: VALUE"',
                   help="send this header with every request (repeatable; for other auth schemes; an Authorization "
                   "header given here replaces the token's)")
    return p


def _terminate_like_ctrl_c(signum, frame) -> None:
    """SIGTERM (``kill``, a job scheduler, a container stop) ends the run as Ctrl-C does: the prompt is dropped from
    the server's queue, or interrupted if it is running, and the exit code is 130. A client started in the
    background of a script inherits SIGINT ignored, so then the interrupt is raised here rather than signalled."""
    if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL, None):
        raise KeyboardInterrupt
    signal.raise_signal(signal.SIGINT)


async def run_until_terminated(client: Client, timeout: float) -> None:
    """``client.run()`` within ``timeout``; SIGTERM cancels it as Ctrl-C does (the prompt cancelled on the server,
    then KeyboardInterrupt). Handled by the event loop, so the cancel runs at an await, never half-way through a
    request, also when SIGINT is ignored (a client started in the background of a script)."""
    loop, task, terminated = asyncio.get_running_loop(), asyncio.current_task(), []
    on_main_thread = threading.current_thread() is threading.main_thread()
    if on_main_thread:
        loop.add_signal_handler(signal.SIGTERM, lambda: (terminated.append(True), task.cancel()))
    try:
        await asyncio.wait_for(client.run(), timeout)
    except asyncio.CancelledError:
        if terminated:
            raise KeyboardInterrupt from None
        raise
    finally:
        if on_main_thread:
            loop.remove_signal_handler(signal.SIGTERM)
            signal.signal(signal.SIGTERM, _terminate_like_ctrl_c)


def cancel_outcome(client: Client | None) -> str:
    """What became of the prompt on the server after a cancel, for the last line."""
    if client is None or client.prompt_id is None:
        return ""
    if client.stopped_on_server:
        return f" (prompt {client.prompt_id} cancelled on the server)"
    return (f" (prompt {client.prompt_id} may still be running: the server still listed it after "
            f"{CANCEL_CONFIRM_S:g} s of interrupts; check {client.base}/queue)")


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate_like_ctrl_c)
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # --help, or argparse's own usage error (exit 2)
        return e.code if isinstance(e.code, int) else 2
    client = None
    try:
        headers = auth_headers(args.token if args.token is not None else os.environ.get(TOKEN_ENV), args.header)
        base = server_url(args.server)
        graph = load_any(args.workflow, base, headers)
        if args.list_inputs:
            print(listing(graph))
            return 0
        if not args.timeout > 0:
            raise Fail(f"--timeout must be positive, not {args.timeout:g}", 2)
        graph, uploads = apply_sets(graph, args.set)
        client = Client(base, graph, uploads, Path(args.out), headers)
        try:
            asyncio.run(run_until_terminated(client, args.timeout))
        except asyncio.TimeoutError:
            raise Fail(f"timed out after {args.timeout:g} s waiting for ComfyUI at {client.base}"
                       f"{cancel_outcome(client)}") from None
        return 0
    except Fail as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted{cancel_outcome(client)}", file=sys.stderr)
        return 130
