"""The running server driven through its HTTP API with ``gradio_client``, as a script or another app would."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from tests.conftest import write_images
from tests.e2e.server import Server

pytestmark = pytest.mark.e2e

ADAPTER = "api-disc"
TRAIN_STEPS = 4
GEN_STEPS = 2
JOB_TIMEOUT_S = 180.0
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NO_ADAPTERS = (None, None, None)
UNIT_WEIGHTS = (1.0, 1.0, 1.0)


def make_client(url: str, downloads: Path) -> Client:
    downloads.mkdir(parents=True, exist_ok=True)
    return Client(url, verbose=False, download_files=str(downloads), analytics_enabled=False)


@pytest.fixture(scope="module")
def client(server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Client:
    return make_client(server_url, tmp_path_factory.mktemp("client-downloads"))


def job_id_for(client: Client, title: str) -> str:
    """The full id of the newest job with this title (``job_status`` with no job lists them all)."""
    _, choices, *_ = client.predict(None, api_name="/job_status")
    ids = [value for label, value in choices["choices"] if f"· {title} ·" in label]
    assert ids, f"no job titled {title!r} in {choices['choices']}"
    return ids[0]


def wait_for_job(client: Client, job_id: str, timeout: float = JOB_TIMEOUT_S) -> str:
    """Poll ``job_status`` until the job's detail shows a final status; returns that detail text."""
    deadline = time.monotonic() + timeout
    detail = ""
    while time.monotonic() < deadline:
        _, _, detail, _, _ = client.predict(job_id, api_name="/job_status")
        match = re.search(r"status \*\*(\w+)\*\*", detail)
        if match and match.group(1) in ("succeeded", "failed", "cancelled", "interrupted"):
            return detail
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish within {timeout:.0f} s; last detail:\n{detail}")


def adapter_id(client: Client, name: str) -> str:
    """The dropdown value of an adapter (this also loads the choices into the client's session)."""
    pickers = client.predict(api_name="/adapter_choices")
    ids = [value for label, value in pickers[0]["choices"] if label == f"{name} (lora)"]
    assert ids, f"{name} is not among the adapter choices {pickers[0]['choices']}"
    return ids[0]


def generate(client: Client, prompt: str, adapter: str | None, weight: float, seed: int = 0):
    return client.predict(prompt, "", seed, GEN_STEPS, 7.5, "merge", adapter, *NO_ADAPTERS, weight,
                          *UNIT_WEIGHTS, api_name="/generate")


def assert_png(path: str | Path, size: tuple[int, int] = (64, 64)) -> np.ndarray:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG file"
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        assert image.size == size
        return np.asarray(image.convert("RGB"))


def image_record(server: Server, result_path: str) -> dict:
    """The server's JSON record of a generated image (the result file is named after the image id)."""
    image_id = Path(result_path).stem
    records = list((server.data_dir / "artifacts" / "images").glob(f"*/{image_id}.json"))
    assert len(records) == 1, f"no record of image {image_id} under {server.data_dir}"
    return json.loads(records[0].read_text())


@pytest.fixture(scope="module")
def trained(client: Client, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Train ``api-disc`` through the ``/train`` endpoint and wait for the job; returns the adapter's id."""
    images = write_images(tmp_path_factory.mktemp("api-upload"), 3)
    captions = [p.with_suffix(".txt") for p in images]
    message = client.predict([handle_file(str(p)) for p in [*images, *captions]], ADAPTER, "zqx", "subject",
                             "lora", TRAIN_STEPS, 4, api_name="/train")
    assert f"Queued **train {ADAPTER} (lora)**" in message
    assert "3 image(s)" in message
    short = re.search(r"job `([0-9a-f]{8})`", message).group(1)
    job_id = job_id_for(client, f"train {ADAPTER} (lora)")
    assert job_id.startswith(short)
    detail = wait_for_job(client, job_id)
    assert "status **succeeded**" in detail, detail
    assert f"step {TRAIN_STEPS}/{TRAIN_STEPS}" in detail
    return adapter_id(client, ADAPTER)


def test_api_has_stable_endpoint_names(client: Client) -> None:
    api = client.view_api(print_info=False, return_format="dict")
    names = set(api["named_endpoints"])
    expected = {"/train", "/job_status", "/cancel_job", "/list_adapters", "/adapter_choices", "/generate"}
    assert expected <= names, f"missing endpoints: {sorted(expected - names)}"
    train_params = [p["parameter_name"] for p in api["named_endpoints"]["/train"]["parameters"]]
    assert train_params[:2] == ["uploaded", "concept"]


def test_bad_requests_get_readable_errors(client: Client) -> None:
    with pytest.raises(AppError, match="upload at least one image"):
        client.predict([], "nothing", "sks", "subject", "lora", 4, 4, api_name="/train")
    with pytest.raises(AppError, match="prompt is empty"):
        generate(client, "   ", None, 1.0)


def test_train_then_generate_png(client: Client, trained: str, server: Server) -> None:
    gallery = client.predict("", False, api_name="/list_adapters")
    assert any(ADAPTER in (item.get("caption") or "") for item in gallery), gallery

    result, status, history = generate(client, "a photo of zqx disc", trained, 0.8)
    assert_png(result)
    assert "1 adapter(s)" in status
    assert history, "the history gallery should list the new image"
    record = image_record(server, result)
    assert record["prompt"] == "a photo of zqx disc"
    assert [(a["adapter"], a["weight"]) for a in record["adapters"]] == [(trained, 0.8)]


def test_concurrent_generations_get_their_own_results(server: Server, trained: str, tmp_path: Path) -> None:
    weights = (-2.0, 2.0)

    def run(weight: float):
        own = make_client(server.url, tmp_path / f"w{weight}")
        picked = adapter_id(own, ADAPTER)
        result, status, _ = generate(own, "a photo of zqx disc", picked, weight, seed=3)
        return result, status

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, weights))

    (first, _), (second, _) = results
    assert Path(first).stem != Path(second).stem, "both calls returned the same image"
    pixels = [assert_png(path) for path, _ in results]
    for (path, status), weight in zip(results, weights):
        assert "1 adapter(s)" in status
        record = image_record(server, path)
        assert record["seed"] == 3
        assert [a["weight"] for a in record["adapters"]] == [weight], "a caller got another caller's image"
    assert not np.array_equal(pixels[0], pixels[1]), "adapter weights -2 and 2 gave identical images"


NO_CONCEPTS = ("", "", "", "")


def test_compare_composers_grid(client: Client, trained: str, server: Server) -> None:
    composers = ["merge", "switch", "composite"]
    gallery, status = client.predict("a photo of zqx disc", "", 7, GEN_STEPS, 7.5, "merge", trained, *NO_ADAPTERS,
                                     0.8, *UNIT_WEIGHTS, *NO_CONCEPTS, composers, api_name="/compare")
    assert "compared 3 composer(s)" in status, status
    assert [item["caption"].split(" · ")[0] for item in gallery] == composers
    paths = []
    for item, name in zip(gallery, composers):
        image = item["image"]
        path = image if isinstance(image, str) else image["path"]
        assert_png(path)
        record = image_record(server, path)
        assert record["composer"] == name and record["seed"] == 7
        assert [(a["adapter"], a["weight"]) for a in record["adapters"]] == [(trained, 0.8)]
        seconds = record["params"]["sample_seconds"]
        assert item["caption"] == f"{name} · {seconds:.2f} s"
        paths.append(path)
    assert len({Path(p).stem for p in paths}) == 3
    with pytest.raises(AppError, match="at least one composer"):
        client.predict("a disc", "", 0, GEN_STEPS, 7.5, "merge", *NO_ADAPTERS, None, *UNIT_WEIGHTS, 1.0,
                       *NO_CONCEPTS, [], api_name="/compare")
