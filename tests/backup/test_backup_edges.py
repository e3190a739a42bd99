"""What `popbox backup` and `popbox restore` do when things go wrong: a backup killed
half way, a snapshot altered after it was written, a target that holds data, mail
that lives in PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from popbox.backup import complete_snapshots
from popbox.backup.manifest import verify_snapshot
from popbox.backup.snapshot import PARTIAL_PREFIX
from support.serverproc import POPBOX, ServerProcess, deliver_lmtp, running

from .live import PASSWORD, make_config, message, popbox, see


def populated(directory: Path) -> ServerProcess:
    """A server's data directory with mail for alice and bob, the server stopped."""
    server = make_config(directory, ("alice", "bob"))
    with running(server):
        for number in range(5):
            assert deliver_lmtp(server.lmtp_port, "alice", message(f"a{number}")) == 250
            assert deliver_lmtp(server.lmtp_port, "bob", message(f"b{number}")) == 250
        see(server, "alice")
        see(server, "bob")
    return server


def backup(server: ServerProcess, dest: Path) -> Path:
    done = popbox(server.config, "backup", str(dest), "--json")
    return Path(json.loads(done.stdout)["snapshot"])


def test_killed_backup_leaves_no_complete_snapshot_and_the_next_one_succeeds(
    tmp_path: Path,
) -> None:
    server = make_config(tmp_path / "live", ("alice", "bob"))
    dest = tmp_path / "backups"
    with running(server):
        for number in range(5):
            assert deliver_lmtp(server.lmtp_port, "alice", message(f"a{number}")) == 250
            assert deliver_lmtp(server.lmtp_port, "bob", message(f"b{number}")) == 250
        # bob's session holds his lock: the backup does alice, then waits for bob.
        client = server.pop3("bob")
        try:
            process = subprocess.Popen(
                [*POPBOX, "backup", str(dest), "--config", str(server.config)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            assert process.stderr is not None
            for line in process.stderr:
                if b"waiting for a session of bob" in line:
                    break
            os.kill(process.pid, signal.SIGKILL)
            process.wait(30)
            process.stderr.close()
            assert process.returncode == -signal.SIGKILL
            assert complete_snapshots(dest) == []
            partial = [path for path in dest.iterdir() if path.name.startswith(PARTIAL_PREFIX)]
            assert len(partial) == 1
            assert len(list((partial[0] / "files" / "mail" / "alice" / "new").iterdir())) == 5
            assert not (partial[0] / "manifest.json").exists()
        finally:
            client.quit()
        done = popbox(server.config, "backup", str(dest))
        assert f"removed {partial[0].name}" in done.stderr
        expected = see(server, "bob")
    (snapshot,) = complete_snapshots(dest)
    assert not [path for path in dest.iterdir() if path.name.startswith(PARTIAL_PREFIX)]
    manifest = verify_snapshot(snapshot)
    assert manifest.messages_of("alice") == 5
    assert manifest.messages_of("bob") == 5
    restored = make_config(tmp_path / "restored", passwd=False)
    popbox(restored.config, "restore", str(dest))
    with running(restored):
        assert see(restored, "bob") == expected


def test_restore_refuses_a_snapshot_whose_message_was_altered(tmp_path: Path) -> None:
    server = populated(tmp_path / "live")
    snapshot = backup(server, tmp_path / "backups")
    message_file = next((snapshot / "files" / "mail" / "alice" / "cur").iterdir())
    message_file.write_bytes(message_file.read_bytes().replace(b"body", b"BODY"))
    restored = make_config(tmp_path / "restored", passwd=False)
    done = popbox(restored.config, "restore", str(snapshot), check=False)
    assert done.returncode == 1
    assert "does not match its manifest" in done.stderr
    assert "its SHA-256 is not the manifest's" in done.stderr
    assert not (restored.directory / "data").exists()  # nothing written


def test_restore_refuses_a_manifest_that_names_a_path_outside_the_snapshot(
    tmp_path: Path,
) -> None:
    server = populated(tmp_path / "live")
    snapshot = backup(server, tmp_path / "backups")
    manifest_path = snapshot / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][0]["path"] = "data/../../../../etc/cron.d/popbox"
    manifest_path.write_text(json.dumps(manifest))
    restored = make_config(tmp_path / "restored", passwd=False)
    done = popbox(restored.config, "restore", str(snapshot), check=False)
    assert done.returncode == 1
    assert "not a path inside the snapshot" in done.stderr
    assert not (restored.directory / "data").exists()


def test_restore_refuses_a_manifest_that_writes_a_file_over_a_root(tmp_path: Path) -> None:
    server = populated(tmp_path / "live")
    snapshot = backup(server, tmp_path / "backups")
    manifest_path = snapshot / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entry = next(entry for entry in manifest["files"] if entry["path"] == "passwd")
    (snapshot / "files" / "mail-as-file").write_bytes((snapshot / "files" / "passwd").read_bytes())
    manifest["files"].append(dict(entry, path="mail-as-file"))
    manifest_path.write_text(json.dumps(manifest))
    restored = make_config(tmp_path / "restored", passwd=False)
    done = popbox(restored.config, "restore", str(snapshot), check=False)
    assert done.returncode == 1
    assert "outside its roots" in done.stderr
    assert not (restored.directory / "data").exists()


def test_restore_refuses_a_file_swapped_for_a_symlink(tmp_path: Path) -> None:
    server = populated(tmp_path / "live")
    snapshot = backup(server, tmp_path / "backups")
    passwd = snapshot / "files" / "passwd"
    secret = tmp_path / "elsewhere"
    secret.write_bytes(passwd.read_bytes())  # the same octets, reached by a link
    passwd.unlink()
    passwd.symlink_to(secret)
    restored = make_config(tmp_path / "restored", passwd=False)
    done = popbox(restored.config, "restore", str(snapshot), check=False)
    assert done.returncode == 1
    assert "passwd" in done.stderr


def test_restore_into_a_data_dir_that_holds_mail_needs_force(tmp_path: Path) -> None:
    server = populated(tmp_path / "live")
    snapshot = backup(server, tmp_path / "backups")
    target = populated(tmp_path / "other")
    with running(target):
        assert deliver_lmtp(target.lmtp_port, "alice", message("stranger")) == 250
    done = popbox(target.config, "restore", str(snapshot), check=False)
    assert done.returncode == 1
    assert "is not empty" in done.stderr
    assert "--force" in done.stderr
    popbox(target.config, "restore", str(snapshot), "--force")
    with running(server):
        expected = see(server, "alice")
    with running(target):
        assert see(target, "alice") == expected  # the stranger is gone with the rest
    passwd = target.directory / "data" / "passwd"
    assert passwd.stat().st_mode & 0o777 == 0o600
    assert PASSWORD in passwd.read_text()


def test_postgresql_mail_is_left_to_pg_dump_and_the_local_files_are_backed_up(
    tmp_path: Path,
) -> None:
    server = make_config(tmp_path / "node", ("alice",))
    config = server.config
    config.write_text(
        'storage = { backend = "postgresql" }\n'
        'postgresql = { dsn = "postgresql://popbox@127.0.0.1:1/popbox" }\n' + config.read_text()
    )
    tls = server.directory / "data" / "tls"
    tls.mkdir(mode=0o700)
    (tls / "cert.pem").write_text("certificate\n")
    (tls / "key.pem").write_text("key\n")
    dest = tmp_path / "backups"
    done = popbox(config, "backup", str(dest), check=False)
    assert done.returncode == 3
    assert "the mail is in PostgreSQL" in done.stderr
    assert "pg_dump" in done.stderr
    (snapshot,) = complete_snapshots(dest)
    manifest = verify_snapshot(snapshot)
    assert {root.name for root in manifest.roots} >= {"data", "passwd", "tls-cert", "tls-key"}
    assert manifest.root("mail") is None
    assert manifest.users == ["alice"]
    assert any("pg_dump" in note for note in manifest.not_included)
    assert popbox(config, "backup", str(dest), "--local-only").returncode == 0


@pytest.mark.parametrize("setting", ['mail_location = "maildir:~/Maildir"'])
def test_maildirs_placed_by_a_template_are_refused(tmp_path: Path, setting: str) -> None:
    server = make_config(tmp_path / "node", ("alice",))
    server.config.write_text(f"storage = {{ {setting} }}\n" + server.config.read_text())
    done = popbox(server.config, "backup", str(tmp_path / "backups"), check=False)
    assert done.returncode == 1
    assert "mail_location" in done.stderr
    assert not (tmp_path / "backups").exists() or complete_snapshots(tmp_path / "backups") == []


def test_a_destination_inside_the_maildirs_is_refused(tmp_path: Path) -> None:
    server = make_config(tmp_path / "node", ("alice",))
    dest = server.directory / "data" / "mail" / "backups"
    dest.parent.mkdir()
    done = popbox(server.config, "backup", str(dest), check=False)
    assert done.returncode == 1
    assert "back up elsewhere" in done.stderr
    assert not dest.exists()


def test_restore_follows_the_other_machines_layout(tmp_path: Path) -> None:
    server = populated(tmp_path / "live")
    with running(server):
        expected = see(server, "alice"), see(server, "bob")
    snapshot = backup(server, tmp_path / "backups")
    elsewhere = make_config(tmp_path / "elsewhere", passwd=False)
    vmail, passwd = tmp_path / "vmail", tmp_path / "etc" / "popbox-passwd"
    elsewhere.config.write_text(
        f'storage = {{ maildir_root = "{vmail}" }}\nauth = {{ passwd_file = "{passwd}" }}\n'
        + elsewhere.config.read_text()
    )
    popbox(elsewhere.config, "restore", str(snapshot))
    assert (vmail / "alice" / "popbox-index").is_file()
    assert passwd.stat().st_mode & 0o777 == 0o600
    assert not (elsewhere.directory / "data" / "mail").exists()
    with running(elsewhere):
        assert (see(elsewhere, "alice"), see(elsewhere, "bob")) == expected
