"""`moekit publish` through the real huggingface_hub client against a local HTTP server that plays the Hub.

The server implements the endpoints `HfApi.create_repo`, `create_branch` and `upload_folder` call
(repo creation, branch, validate-yaml, preupload, the LFS batch API and PUT, commit, revision info),
keeps the repository's files, and records every request, so the tests check what reached "the Hub".
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from huggingface_hub.utils.sha import git_hash

from moekit.build.options import BuildOptions
from moekit.build.pipeline import build
from moekit.recipe import parse_recipe
from moekit.testing import help_in_fresh_process

TOKEN = "hf_moekitTestToken0123456789abcdef"
LFS_THRESHOLD = 10_000  # files above this go through LFS, like weights on the real Hub


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.requests: list[dict] = []
        self.repos: dict[str, dict] = {}  # repo id -> {"private", "branches": {name: {path: (oid, content)}}}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content
        self.fail_create_with: int | None = None
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def calls(self, kind: str) -> list[dict]:
        return [r for r in self.requests if r["kind"] == kind]


class HubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def _handle(self, method: str) -> None:
        url = urlparse(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = url.path.strip("/").split("/")
        record = {"method": method, "path": url.path, "query": parse_qs(url.query), "auth": self.headers.get("Authorization")}
        with self.server.lock:
            kind, status, reply = self._route(method, parts, url, body, record)
            record["kind"] = kind
            self.server.requests.append(record)
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self, method, parts, url, body, record):
        hub = self.server
        if record["auth"] != f"Bearer {TOKEN}" and parts[0] != "lfs-upload":
            return "unauthorized", 401, {"error": "Invalid credentials"}
        if method == "POST" and parts[:3] == ["api", "repos", "create"]:
            payload = json.loads(body)
            record["json"] = payload
            if hub.fail_create_with:  # a Hub error whose message echoes the credentials, as a misbehaving proxy might
                return "create", hub.fail_create_with, {"error": f"internal error for {record['auth']}"}
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id in hub.repos:
                return "create", 409, {"error": "You already created this model repo", "url": f"{hub.endpoint}/{repo_id}"}
            hub.repos[repo_id] = {"private": payload.get("visibility") == "private", "branches": {"main": {}}}
            return "create", 200, {"url": f"{hub.endpoint}/{repo_id}"}
        if method == "POST" and parts[:2] == ["api", "validate-yaml"]:
            record["json"] = json.loads(body)
            return "validate", 200, {"errors": [], "warnings": []}
        if method == "POST" and parts[0] == "api" and parts[1] == "models" and len(parts) >= 5:
            repo_id, action, revision = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
            repo = hub.repos.get(repo_id)
            if repo is None:
                return action, 404, {"error": "Repository not found"}
            if action == "branch":
                repo["branches"].setdefault(revision, dict(repo["branches"]["main"]))
                return "branch", 200, {}
            files = repo["branches"].get(revision, repo["branches"]["main"])
            if action == "preupload":
                payload = json.loads(body)
                record["json"] = payload
                modes = [
                    {
                        "path": f["path"],
                        "uploadMode": "lfs" if f["size"] > LFS_THRESHOLD else "regular",
                        "shouldIgnore": False,
                        "oid": files[f["path"]][0] if f["path"] in files else None,
                    }
                    for f in payload["files"]
                ]
                return "preupload", 200, {"files": modes}
            if action == "commit":
                lines = [json.loads(line) for line in body.decode().splitlines() if line]
                record["lines"] = lines
                target = files if "create_pr" not in record["query"] else dict(repo["branches"]["main"])
                for line in lines:
                    value = line["value"]
                    if line["key"] == "file":
                        content = base64.b64decode(value["content"])
                        target[value["path"]] = (git_hash(content), content)
                    elif line["key"] == "lfsFile":
                        assert value["oid"] in hub.lfs, "commit names an LFS object that was never uploaded"
                        target[value["path"]] = (value["oid"], hub.lfs[value["oid"]])
                repo["branches"].setdefault(revision, target)
                oid = hashlib.sha1(json.dumps(sorted(target)).encode() + str(len(hub.requests)).encode()).hexdigest()
                reply = {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True}
                if "create_pr" in record["query"]:
                    reply["pullRequestUrl"] = f"{hub.endpoint}/{repo_id}/discussions/1"
                return "commit", 200, reply
        if method == "POST" and url.path.endswith(".git/info/lfs/objects/batch"):
            payload = json.loads(body)
            record["json"] = payload
            objects = []
            for obj in payload["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in hub.lfs:  # already stored objects get no actions: nothing to upload again
                    entry["actions"] = {"upload": {"href": f"{hub.endpoint}/lfs-upload/{obj['oid']}"}}
                objects.append(entry)
            return "lfs-batch", 200, {"transfer": "basic", "objects": objects}
        if method == "PUT" and parts[0] == "lfs-upload":
            assert hashlib.sha256(body).hexdigest() == parts[1]
            hub.lfs[parts[1]] = body
            return "lfs-put", 200, {}
        if method == "GET" and parts[:2] == ["api", "models"] and "revision" in parts:
            repo_id = f"{parts[2]}/{parts[3]}"
            return "info", 200, {"id": repo_id, "sha": "0" * 40, "private": False, "siblings": []}
        return "unknown", 404, {"error": f"no route for {method} {url.path}"}


@pytest.fixture
def hub():
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def moe_dir(llama_family, tmp_path_factory) -> Path:
    """A tiny build, with a trainer checkpoint and a cache that must not be uploaded."""
    out = tmp_path_factory.mktemp("publish") / "tiny-moe"
    text = "\n".join(
        [
            f"base_model: {llama_family['base']}",
            "gate_mode: random",
            "dtype: float32",
            "experts_per_token: 1",
            "experts:",
            f"  - source_model: {llama_family['e0']}",
            f"  - source_model: {llama_family['e1']}",
            "moekit:",
            "  license: apache-2.0",
            "",
        ]
    )
    build(parse_recipe(text), out, BuildOptions(device="cpu"), recipe_text=text)
    (out / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-5" / "optimizer.pt").write_bytes(b"\0" * 2048)
    (out / "__pycache__").mkdir()
    (out / "__pycache__" / "x.pyc").write_bytes(b"\0")
    return out


def run_publish(args: list[str], endpoint: str, tmp_path: Path, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process: huggingface_hub reads HF_ENDPOINT when it is imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_ETAG_TIMEOUT="2",
        HF_HUB_DOWNLOAD_TIMEOUT="5",
    )
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "moekit", "publish", *args], check=False, env=env, capture_output=True, text=True, timeout=120)


def uploaded_tree(model_dir: Path) -> dict[str, bytes]:
    return {
        p.relative_to(model_dir).as_posix(): p.read_bytes()
        for p in sorted(model_dir.rglob("*"))
        if p.is_file() and "checkpoints" not in p.parts and "__pycache__" not in p.parts
    }


def test_upload_creates_repo_and_commits_the_folder_once(hub, moe_dir, tmp_path):
    done = run_publish([str(moe_dir), "--repo-id", "me/tiny-moe", "--private"], hub.endpoint, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["json"] for r in hub.calls("create")] == [{"name": "tiny-moe", "organization": "me", "visibility": "private", "type": "model"}]
    assert hub.repos["me/tiny-moe"]["private"]
    commits = hub.calls("commit")
    assert len(commits) == 1 and commits[0]["path"] == "/api/models/me/tiny-moe/commit/main"
    stored = {path: content for path, (_, content) in hub.repos["me/tiny-moe"]["branches"]["main"].items()}
    assert stored == uploaded_tree(moe_dir)  # every file, byte for byte; no checkpoints or caches
    assert "model.safetensors" in stored and len(hub.calls("lfs-put")) >= 1  # the weights took the LFS path
    card = stored["README.md"].decode()
    assert "license: apache-2.0" in card and 'from_pretrained("me/tiny-moe"' in card
    assert hub.calls("validate")[0]["json"]["content"] == card  # huggingface_hub sent the card for validation first
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in hub.requests if r["kind"] != "lfs-put")
    assert "me/tiny-moe" in done.stdout and TOKEN not in done.stdout + done.stderr


def test_retry_uploads_nothing_twice(hub, moe_dir, tmp_path):
    assert run_publish([str(moe_dir), "--repo-id", "me/again"], hub.endpoint, tmp_path).returncode == 0
    puts = len(hub.calls("lfs-put"))
    done = run_publish([str(moe_dir), "--repo-id", "me/again"], hub.endpoint, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(hub.calls("lfs-put")) == puts  # the Hub already has every LFS object
    assert len(hub.calls("commit")) == 1  # and every regular file: no second, empty commit
    assert hub.calls("create")[-1]["kind"] == "create"  # the existing repo (409) is accepted


def test_revision_branch_and_pull_request(hub, moe_dir, tmp_path):
    done = run_publish([str(moe_dir), "--repo-id", "me/branched", "--revision", "v1"], hub.endpoint, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["path"] for r in hub.calls("branch")] == ["/api/models/me/branched/branch/v1"]
    assert hub.calls("commit")[-1]["path"] == "/api/models/me/branched/commit/v1"
    assert "README.md" in hub.repos["me/branched"]["branches"]["v1"] and not hub.repos["me/branched"]["branches"]["main"]

    done = run_publish([str(moe_dir), "--repo-id", "me/branched", "--create-pr"], hub.endpoint, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    commit = hub.calls("commit")[-1]
    assert commit["path"] == "/api/models/me/branched/commit/main" and commit["query"] == {"create_pr": ["1"]}
    assert "discussions/1" in done.stdout


def test_hub_errors_are_one_message_without_the_token(hub, moe_dir, tmp_path):
    hub.fail_create_with = 500
    done = run_publish([str(moe_dir), "--repo-id", "me/broken"], hub.endpoint, tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("error: uploading to me/broken failed") and "Traceback" not in done.stderr
    assert TOKEN not in done.stdout + done.stderr and "***" in done.stderr  # the server echoed it; moekit scrubbed it
    assert not hub.calls("commit")


def test_unreachable_endpoint_is_one_message(moe_dir, tmp_path):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = run_publish([str(moe_dir), "--repo-id", "me/offline"], f"http://127.0.0.1:{port}", tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "uploading to me/offline failed" in done.stderr and TOKEN not in done.stderr


def test_dry_run_lists_files_and_card_and_touches_nothing(hub, moe_dir, tmp_path):
    before = uploaded_tree(moe_dir)
    done = run_publish([str(moe_dir), "--repo-id", "me/dry", "--dry-run"], hub.endpoint, tmp_path, token=None)
    assert done.returncode == 0, done.stderr[-3000:]
    assert hub.requests == []  # nothing remote, not even without a token
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"would upload {len(before)} files")
    listed = [line.split()[0] for line in lines[1 : lines.index("")]]
    assert sorted(listed) == sorted(before)  # exactly the files an upload sends
    assert "checkpoints/checkpoint-5/optimizer.pt" not in done.stdout
    assert "base_model_relation: merge" in done.stdout and 'from_pretrained("me/dry"' in done.stdout
    assert "dry run: nothing was uploaded" in done.stdout
    assert uploaded_tree(moe_dir) == before  # not even the local card was rewritten


def test_missing_token_is_refused_before_any_request(hub, moe_dir, tmp_path):
    done = run_publish([str(moe_dir), "--repo-id", "me/x"], hub.endpoint, tmp_path, token=None)
    assert done.returncode == 1 and "no Hugging Face token" in done.stderr and hub.requests == []


def test_token_is_never_written_to_the_folder(hub, moe_dir, tmp_path):
    assert run_publish([str(moe_dir), "--repo-id", "me/secret"], hub.endpoint, tmp_path).returncode == 0
    for path in moe_dir.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


@pytest.mark.parametrize(
    "remove, message",
    [
        ("model.safetensors", "model weights"),
        ("config.json", "config.json"),
        ("tokenizer.json", "tokenizer files"),
    ],
)
def test_incomplete_directory_is_refused_with_what_is_missing(hub, moe_dir, tmp_path, remove, message):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(moe_dir, broken)
    (broken / remove).unlink()
    if remove == "tokenizer.json":
        (broken / "tokenizer_config.json").unlink()
    done = run_publish([str(broken), "--repo-id", "me/x"], hub.endpoint, tmp_path)
    assert done.returncode == 1 and f"is not a complete MoE build: missing {message}" in done.stderr
    assert hub.requests == []


def test_missing_shard_is_named(moe_dir, tmp_path):
    import shutil

    from moekit.errors import PublishError
    from moekit.publish import publish

    sharded = tmp_path / "sharded"
    shutil.copytree(moe_dir, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(PublishError, match="weight shards listed in model.safetensors.index.json: model-00002-of-00002.safetensors"):
        publish(sharded, "me/x", dry_run=True)


def test_disagreeing_licenses_need_license_to_publish(hub, moe_dir, tmp_path):
    import shutil

    conflict = tmp_path / "conflict"
    shutil.copytree(moe_dir, conflict)
    metadata = json.loads((conflict / "moekit.json").read_text())
    for ref, license_ in zip(metadata["sources"], ["apache-2.0", "mit", "llama3"]):
        metadata["sources"][ref]["license"] = license_
    (conflict / "moekit.json").write_text(json.dumps(metadata))
    (conflict / "moekit-recipe.yaml").write_text((conflict / "moekit-recipe.yaml").read_text().replace("  license: apache-2.0\n", ""))
    done = run_publish([str(conflict), "--repo-id", "me/x", "--dry-run"], hub.endpoint, tmp_path)
    assert done.returncode == 1 and "licenses disagree" in done.stderr and "--license" in done.stderr
    done = run_publish([str(conflict), "--repo-id", "me/x", "--license", "llama3"], hub.endpoint, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert b"license: llama3" in hub.repos["me/x"]["branches"]["main"]["README.md"][1]


def test_adapter_needs_a_hub_base_model(hub, moe_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    model = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    done = run_publish([str(adapter), "--repo-id", "me/lora"], hub.endpoint, tmp_path)
    assert done.returncode == 1 and "not a Hub repository" in done.stderr and "--base-model" in done.stderr
    done = run_publish([str(adapter), "--repo-id", "me/lora", "--base-model", "me/tiny-moe"], hub.endpoint, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    stored = hub.repos["me/lora"]["branches"]["main"]
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(stored)
    card = stored["README.md"][1].decode()
    assert "base_model:\n- me/tiny-moe" in card and "base_model_relation: adapter" in card and "library_name: peft" in card
    (adapter / "adapter_model.safetensors").unlink()
    done = run_publish([str(adapter), "--repo-id", "me/lora", "--base-model", "me/tiny-moe"], hub.endpoint, tmp_path)
    assert done.returncode == 1 and "missing adapter weights" in done.stderr


def test_bad_repo_id_and_pr_with_branch_are_refused(moe_dir, tmp_path):
    from moekit.errors import PublishError
    from moekit.publish import publish

    with pytest.raises(PublishError, match="not a Hub repository id"):
        publish(moe_dir, "no-namespace", dry_run=True)
    with pytest.raises(PublishError, match="create-pr"):
        publish(moe_dir, "me/x", revision="dev", create_pr=True, dry_run=True)


def test_dry_run_lists_exactly_what_the_upload_sends_with_a_report(hub, moe_dir, tmp_path):
    import shutil

    model_dir = tmp_path / "moe"
    shutil.copytree(moe_dir, model_dir)
    report_dir = tmp_path / "eval-out"
    report_dir.mkdir()
    (report_dir / "report.json").write_text(
        json.dumps({"models": [{"name": "moe", "path": str(model_dir), "role": "moe", "metrics": {"code": {"perplexity": 9.5, "loss": 2.25, "tokens": 10}}}]})
    )
    (report_dir / "perplexity.png").write_bytes(b"\x89PNG not really")
    args = [str(model_dir), "--repo-id", "me/evaluated", "--report", str(report_dir)]
    dry = run_publish([*args, "--dry-run"], hub.endpoint, tmp_path)
    assert dry.returncode == 0, dry.stderr[-3000:]
    lines = dry.stdout.splitlines()
    listed = [line.split()[0] for line in lines[1 : lines.index("")]]
    assert not (model_dir / "eval").exists()  # a dry run copies nothing
    done = run_publish(args, hub.endpoint, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    stored = hub.repos["me/evaluated"]["branches"]["main"]
    assert sorted(stored) == sorted(listed) and {"eval/report.json", "eval/perplexity.png"} <= set(stored)
    card = stored["README.md"][1].decode()
    assert card in dry.stdout  # the printed card is the uploaded one
    assert "model-index" in card and "value: 9.5" in card and "![perplexity](eval/perplexity.png)" in card


def test_publish_help_does_not_import_torch():
    output, imported_torch = help_in_fresh_process(["publish"])
    assert "--repo-id" in output and not imported_torch
