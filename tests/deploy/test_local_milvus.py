"""deploy/local_milvus.py: two standalone servers side by side on one machine, each with its
own ports (the embedded etcd's included) and its own data."""
from __future__ import annotations

import socket
import uuid

from deploy.local_milvus import LocalMilvus


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_two_servers_side_by_side(tmp_path):
    from pymilvus import MilvusClient

    a = LocalMilvus(tmp_path / "a").start()
    try:
        b = LocalMilvus(tmp_path / "b").start()
        try:
            assert len({a.port, b.port, *a.etcd_ports, *b.etcd_ports}) == 6
            assert all(_listening(p) for p in (*a.etcd_ports, *b.etcd_ports))
            name = f"only_on_a_{uuid.uuid4().hex[:8]}"
            ca, cb = MilvusClient(uri=a.uri), MilvusClient(uri=b.uri)
            ca.create_collection(name, dimension=4)
            assert name in ca.list_collections() and name not in cb.list_collections()
            ca.close()
            cb.close()
        finally:
            b.stop()
    finally:
        a.stop()
