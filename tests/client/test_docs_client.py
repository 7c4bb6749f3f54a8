"""Every example of docs/client.md runs: its ```python blocks against a real server
(``resnet18`` served by the tiny zoo model at the address the page uses), from a folder
holding ``photo.jpg``; its curl lines are run by tests/test_docs.py's markers."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cvserve.config import BatchConfig, ModelConfig, ServerConfig
from cvserve.serving.process import ServerThread, free_port

PAGE = Path(__file__).resolve().parents[2] / "docs" / "client.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), re.M | re.S)
CURL = re.findall(r"^```bash\n(curl .*?)^```", PAGE.read_text(), re.M | re.S)


@pytest.fixture(scope="module")
def served(model_cache, data_dir, tmp_path_factory):
    model = ModelConfig("resnet18", model="tiny-resnet", batching=BatchConfig(max_delay_ms=20))
    srv = ServerThread(ServerConfig(port=free_port(), cache_dir=str(model_cache),
                                    preprocess_threads=2, models=(model,))).start()  # fmt: skip
    folder = tmp_path_factory.mktemp("client-doc")
    shutil.copy(data_dir / "images" / "small" / "dog.jpg", folder / "photo.jpg")
    yield srv.url, folder
    srv.stop()


def test_the_page_has_its_examples():
    assert len(BLOCKS) >= 4 and len(CURL) == 1


@pytest.mark.parametrize("n", range(len(BLOCKS)))
def test_python_example_runs(served, n):
    url, folder = served
    code = BLOCKS[n].replace("http://127.0.0.1:8000", url)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True,
                       text=True, timeout=120, env=env)  # fmt: skip
    assert r.returncode == 0, f"block {n}:\n{code}\n{r.stderr}"


def test_curl_examples_run(served):
    url, folder = served
    script = "set -e\n" + CURL[0].replace("http://127.0.0.1:8000", url)
    r = subprocess.run(["bash", "-c", script], cwd=folder, capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    answers = [line for line in r.stdout.replace("}{", "}\n{").splitlines() if line]
    assert len(answers) == 4 and all('"model":"resnet18"' in a for a in answers), r.stdout
    assert '"results":[' in answers[2]
