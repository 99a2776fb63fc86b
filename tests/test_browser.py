"""The shipped workflows and the pack's nodes in ComfyUI's real frontend, driven in Debian's headless Chromium.

The frontend is the one the test server serves (pip package ``comfyui-frontend-package``); the browser is
Debian's ``/usr/bin/chromium`` (never Playwright's own download). Requests that leave the test server are
aborted, so the page behaves the same on a closed network. First-run UI is switched off the way a user's
settings would: the templates dialog (``Comfy.TutorialCompleted``), release notices
(``Comfy.Notification.ShowVersionUpdates``), the minimap (``Comfy.Minimap.Visible``) through the server's
settings API, and the "Nodes 2.0" banner through its localStorage flag. The missing-nodes warning stays on.
"""

import json
import shutil
from pathlib import Path

import pytest

import host

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.is_file():
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)
try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright
except ImportError:
    pytest.skip("the playwright module is not installed (pip install 'playwright>=1.40')", allow_module_level=True)

pytestmark = pytest.mark.server

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Notification.ShowVersionUpdates": False,
            "Comfy.Minimap.Visible": False}
UI_FILES = sorted((host.ROOT / "example_workflows").glob("*.json"))
DISPLAY_NAMES = ("Load Memory Encoder", "Encode Reference Video", "Reference Memory Bank", "Apply Query Memory",
                 "Apply Reference Memory", "Memory Rollout")
SCREENSHOT = host.ROOT / "output" / "browser" / "memory_rollout.png"
VIEWPORT = {"width": 1600, "height": 1000}
SCREENSHOT_VIEWPORT = {"width": 2560, "height": 1440}  # the whole graph fits at a zoom that still draws text
CANVAS_SPOT = (VIEWPORT["width"] / 2, VIEWPORT["height"] / 2)  # empty once the graph is cleared
# The node search box's input: up to 1.3x inside ``.comfy-vue-node-search-box``, from 1.4x a dialog's "Add a node..."
SEARCH_INPUT = ".comfy-vue-node-search-box input[role=combobox], .p-dialog input[role=combobox]"
# Each result's display name: its aria-label (PrimeVue's autocomplete, up to 1.3x), else its first line of text.
SEARCH_RESULTS = """() => [...document.querySelectorAll('[role=option]')]
  .map((o) => o.getAttribute('aria-label') || o.innerText.split('\\n')[0].trim())"""
NO_DEFAULT = object()
PAGE_ERRORS: list[str] = []  # uncaught exceptions in the page

# Records the node types the frontend reports as missing (it calls app.showMissingNodesError, which opens
# the "missing nodes" dialog), so a test sees the report even if the dialog's wording changes.
SPY_MISSING_NODES = """() => {
  window.__missingNodes = [];
  const show = app.showMissingNodesError.bind(app);
  app.showMissingNodesError = (types) => { window.__missingNodes.push(...types); return show(types); };
}"""

LOAD = """async (workflow) => {
  window.__missingNodes = [];
  await app.loadGraphData(workflow);
  await new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));
  return app.graph.nodes.map((n) => ({
    id: n.id, type: n.type, registered: n.type in LiteGraph.registered_node_types,
    ownClass: n.constructor === LiteGraph.registered_node_types[n.type],
    hasErrors: !!n.has_errors, placeholder: n.last_serialization !== undefined,
    // a file choice the server does not have (the real Wan2.1 weights): frontends from 1.4x flag such a node
    missingFile: (n.widgets || []).some((w) => Array.isArray(w.options?.values) && !w.options.values.includes(w.value)
                                         && /\\.(safetensors|pt|pth|ckpt|bin|gguf|mp4|webm)$/.test(String(w.value))),
  }));
}"""

VISIBLE_POPUPS = """() => [...document.querySelectorAll('.p-dialog, [role=dialog], .p-toast-message')]
  .filter((e) => e.offsetParent !== null || getComputedStyle(e).position === 'fixed')
  .map((e) => e.innerText.trim()).filter((t) => t)"""


@pytest.fixture(scope="module")
def page(server):
    for key, value in SETTINGS.items():
        status, body = server.post(f"/settings/{key}", value)
        assert status == 200, f"setting {key}: {status} {body}"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)  # fresh temp profile
        try:
            pg = browser.new_page(viewport=VIEWPORT)
            pg.route(lambda url: not url.startswith(server.url), lambda route: route.abort())
            pg.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
            pg.on("pageerror", lambda e: PAGE_ERRORS.append(str(e)))
            pg.goto(server.url)
            # window.app is set before the frontend loads its start-up workflow: wait for that too, or it
            # could replace a graph a test has just loaded.
            pg.wait_for_function("() => window.app?.graph && window.LiteGraph && window.app.ui?.settings"
                                 " && app.extensionManager?.workflow?.activeWorkflow"
                                 " && !app.extensionManager.spinner", timeout=60_000)
            pg.wait_for_function("(ids) => ids.every((id) => id in LiteGraph.registered_node_types)",
                                 arg=sorted(host.PACK_NODE_IDS), timeout=30_000)
            pg.evaluate(SPY_MISSING_NODES)
            yield pg
        finally:
            browser.close()


def load(page, path: Path) -> list[dict]:
    close_node_search(page)
    PAGE_ERRORS.clear()
    return page.evaluate(LOAD, json.loads(path.read_text()))


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def expected_prompt(api: dict) -> dict:
    """The API graph with the UI's node ids: the i-th key of the API graph is UI node i+1."""
    ids = {key: str(i + 1) for i, key in enumerate(api)}
    return {ids[key]: {"key": key, "class_type": node["class_type"], "title": node.get("_meta", {}).get("title"),
                       "inputs": {name: [ids[v[0]], v[1]] if is_link(v) else v
                                  for name, v in node["inputs"].items()}}
            for key, node in api.items()}


@pytest.mark.parametrize("path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_ui_workflow_loads_with_no_missing_node(page, path):
    nodes = load(page, path)
    assert len(nodes) == len(json.loads(path.read_text())["nodes"])
    bad = [n for n in nodes if not n["registered"] or not n["ownClass"] or n["placeholder"]
           or n["hasErrors"] and not n["missingFile"]]  # a flag for a file the test server lacks is the user's cue
    assert not bad, f"nodes the frontend could not create: {bad}"
    assert page.evaluate("window.__missingNodes") == []
    popups = page.evaluate(VISIBLE_POPUPS)
    assert not [t for t in popups if "missing" in t.lower()], f"missing-nodes dialog: {popups}"
    assert not popups, f"the load opened a dialog or toast (e.g. workflow validation): {popups}"
    assert not PAGE_ERRORS, f"uncaught errors while loading: {PAGE_ERRORS}"


def declared_default(info: dict, name: str):
    """The default of an optional input (``NO_DEFAULT`` for a required one or one without a default)."""
    spec = info["input"].get("optional", {}).get(name)
    return spec[1]["default"] if spec and len(spec) > 1 and "default" in spec[1] else NO_DEFAULT


@pytest.mark.parametrize("path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_frontend_api_conversion_matches_shipped_api_workflow(server, page, path):
    """Every input of the shipped API graph comes out of the frontend with the same value; an optional input the
    API graph leaves out may come out only as its declared default (a UI widget always has a value, and ComfyUI
    runs an absent optional input as its default)."""
    object_info = server.get("/object_info")
    load(page, path)
    got = page.evaluate("async () => (await app.graphToPrompt()).output")
    want = expected_prompt(json.loads((host.ROOT / "workflows" / "api" / path.name).read_text()))
    diffs = []
    for nid in sorted(set(want) | set(got), key=int):
        if nid not in got or nid not in want:
            diffs.append(f"node {nid}: expected {want.get(nid)}, got {got.get(nid)}")
            continue
        w, g = want[nid], got[nid]
        where = f"node {nid} ({w['key']}, {w['class_type']})"
        if g["class_type"] != w["class_type"]:
            diffs.append(f"{where}: class_type expected {w['class_type']!r}, got {g['class_type']!r}")
        if w["title"] and g.get("_meta", {}).get("title") != w["title"]:
            diffs.append(f"{where}: title expected {w['title']!r}, got {g.get('_meta', {}).get('title')!r}")
        for name in sorted(set(w["inputs"]) | set(g["inputs"])):
            expected, value = w["inputs"].get(name, "<absent>"), g["inputs"].get(name, "<absent>")
            if name not in w["inputs"] and value == declared_default(object_info[w["class_type"]], name):
                continue
            # a V3 dynamic combo's nested input ("format.codec", 0.3x frontends) the API graph gives by its legacy
            # flat name ("codec", which such a host still declares, hidden)
            if name not in w["inputs"] and "." in name and w["inputs"].get(name.rsplit(".", 1)[1], NO_DEFAULT) == value:
                continue
            if expected != value:
                diffs.append(f"{where}: input {name} expected {expected!r}, got {value!r}")
    assert not diffs, "the frontend's API conversion differs from the shipped API workflow:\n" + "\n".join(diffs)


def open_node_search(page):
    """Double-click the empty canvas, as a user does, until the node search box is open; returns its input."""
    box = page.locator(SEARCH_INPUT).first
    for _ in range(3):
        page.mouse.move(*CANVAS_SPOT)
        page.mouse.dblclick(*CANVAS_SPOT)
        try:
            box.wait_for(state="visible", timeout=3_000)
            return box
        except PlaywrightTimeout:
            continue
    pytest.fail("double-clicking the empty canvas did not open the node search box")


def close_node_search(page):
    for _ in range(3):
        box = page.locator(SEARCH_INPUT)
        if not box.count() or not box.first.is_visible():
            return
        page.keyboard.press("Escape")
        try:
            box.first.wait_for(state="hidden", timeout=2_000)
            return
        except PlaywrightTimeout:
            continue


@pytest.mark.parametrize("name", DISPLAY_NAMES)
def test_pack_node_appears_in_node_search(page, name):
    close_node_search(page)
    page.evaluate("() => { app.graph.clear(); app.canvas.setDirty(true, true); }")
    box = open_node_search(page)
    try:
        box.press_sequentially(name)
        try:
            page.wait_for_function(f"(name) => ({SEARCH_RESULTS})().includes(name)", arg=name, timeout=5_000)
        except PlaywrightTimeout:
            labels = page.evaluate(SEARCH_RESULTS)
            pytest.fail(f"{name!r} is not in the node search results: {labels}")
    finally:
        close_node_search(page)


def test_memory_rollout_screenshot_is_saved(page, tmp_path_factory):
    nodes = load(page, host.ROOT / "example_workflows" / "memory_rollout.json")
    page.set_viewport_size(SCREENSHOT_VIEWPORT)
    try:
        page.evaluate("""async () => {
          app.canvas.deselectAll?.();
          await app.extensionManager.command.execute('Comfy.Canvas.FitView');
          const view = () => JSON.stringify([app.canvas.ds.scale, ...app.canvas.ds.offset]);
          for (let i = 0, last = null; i < 30 && view() !== last; i++) {  // the fit is animated: wait till it stops
            last = view();
            await new Promise((done) => setTimeout(done, 100));
          }
          app.canvas.setDirty(true, true);
          await new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));
        }""")
        shot = tmp_path_factory.mktemp("browser") / "memory_rollout.png"
        page.screenshot(path=str(shot))
    finally:
        page.set_viewport_size(VIEWPORT)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT)
    for f in (shot, SCREENSHOT):
        data = f.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        size = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert size == (SCREENSHOT_VIEWPORT["width"], SCREENSHOT_VIEWPORT["height"])
        assert len(data) > 30_000, f"{f} is only {len(data)} bytes for {len(nodes)} nodes"
