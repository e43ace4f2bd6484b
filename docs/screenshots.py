"""The documentation's screenshots, taken from a real run, not drawn: the MLflow UI (the runs
table, a stage's charts, the model registry) and Snakemake's report, each opened in headless
Chromium and written to docs/images/*.png as small palette PNGs.

Usage, in a work directory where a run finished (the pipeline tutorial's steps 1 and 3):

    make pipeline SNAKEMAKE_ARGS="--configfile configs/quick.yaml"
    make report SNAKEMAKE_ARGS="--configfile configs/quick.yaml"
    .venv/bin/python docs/screenshots.py [WORKDIR]      # WORKDIR: . by default

It starts `mlflow ui` on WORKDIR/mlflow.db (a free port on 127.0.0.1), shoots, and stops it.
The images in docs/images come from that run plus a second invocation training pretrain for 200
steps (after the quick preset, `pretrain: {train: {max_steps: 200, eval_every: 25, log_every: 5,
checkpoint_every: 100}}`), so that the charts have more than six points."""

import argparse
import http.server
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import mlflow
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the suite's headless Chromium, one place for both
from headless_browser import browser, dump_dom  # noqa: E402

IMAGES = REPO / "docs" / "images"
STAGE = "pretrain"  # whose charts are shown
# The UI's browser-side state, set before the shots: MLflow 3.17's model registry greets a new
# browser with a modal that would hide the list (its useLocalStorage key, `<key>_v<version>`).
UI_STATE = {"_mlflow_model_registry_promo_modal_dismissed_v1": "true"}
ASSISTANT_WIDTH = 335  # px: the "MLflow Assistant" panel a local server opens at the right, cut off


class _StatePage(http.server.BaseHTTPRequestHandler):
    """One page that writes UI_STATE into the origin's localStorage."""

    def do_GET(self) -> None:
        sets = "".join(f"localStorage.setItem({k!r}, {v!r});" for k, v in UI_STATE.items())
        body = f"<html><body><script>{sets}</script>set</body></html>".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def seed_ui_state(port: int, profile: Path) -> None:
    """localStorage is per origin (host and port): set it from a page on the port the UI will
    have, in the browser profile the shots use, before the UI starts there."""
    server = http.server.HTTPServer(("127.0.0.1", port), _StatePage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dump_dom(f"http://127.0.0.1:{port}/", profile, budget_ms=2000)
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(workdir: Path, port: int) -> subprocess.Popen:
    """`mlflow ui` on the run's store; returns once it answers /health."""
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin), "ui", "--backend-store-uri", "sqlite:///mlflow.db",
           "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    ui = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return ui
        except OSError:
            time.sleep(1)
    ui.terminate()
    raise SystemExit(f"error: mlflow ui on {workdir / 'mlflow.db'} did not answer in 120 s")


def latest_runs(workdir: Path) -> tuple[str, str]:
    """The experiment id and the newest run of STAGE in the work directory's store."""
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"attributes.run_name = '{STAGE}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise SystemExit(f"error: {workdir / 'mlflow.db'}: no {STAGE} run; run the pipeline first")
    return runs[0].info.experiment_id, runs[0].info.run_id


def shoot(url: str, name: str, profile: Path, cut_right: int = 0) -> None:
    """A 1280x900 screenshot of url as docs/images/<name>.png, less cut_right pixels at the
    right, quantised to 256 colours (a small file)."""
    raw = profile.parent / f"{name}.png"
    # drawn only once every compositor stage ran: else MLflow's charts are still spinners
    cmd = [browser(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
           "--virtual-time-budget=60000", "--run-all-compositor-stages-before-draw",
           "--window-size=1280,900", f"--screenshot={raw}", url]  # fmt: skip
    subprocess.run(cmd, capture_output=True, timeout=180, check=True)
    IMAGES.mkdir(parents=True, exist_ok=True)
    tmp = IMAGES / f".{name}.png.tmp"
    image = Image.open(raw).convert("RGB")
    image = image.crop((0, 0, image.width - cut_right, image.height))
    image.quantize(256).save(tmp, format="PNG", optimize=True)
    tmp.replace(IMAGES / f"{name}.png")
    print(f"wrote {IMAGES / f'{name}.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", nargs="?", default=".", type=Path)
    workdir = parser.parse_args().workdir.resolve()
    for needed in ("mlflow.db", "report.html"):
        if not (workdir / needed).is_file():
            raise SystemExit(f"error: {workdir / needed}: not found; run the pipeline tutorial's "
                             "steps 1 and 3 there first")  # fmt: skip
    if browser() is None:
        raise SystemExit("error: no chromium that starts (apt install chromium)")
    experiment, run = latest_runs(workdir)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        profile = Path(tmp) / "chromium"
        seed_ui_state(port, profile)
        ui = start_ui(workdir, port)
        try:
            base = f"http://127.0.0.1:{port}/#"
            training = "workflowType=machine_learning"  # the Model training view, not GenAI
            cut = ASSISTANT_WIDTH
            shoot(f"{base}/experiments/{experiment}?{training}", "mlflow-runs", profile, cut)
            shoot(f"{base}/experiments/{experiment}/runs/{run}/model-metrics?{training}",
                  "mlflow-charts", profile, cut)  # fmt: skip
            shoot(f"{base}/models?{training}", "mlflow-models", profile, cut)
        finally:
            ui.terminate()
            ui.wait(timeout=30)
        shoot((workdir / "report.html").as_uri(), "report", profile)


if __name__ == "__main__":
    main()
