"""The job on a simulated 2-node Ray cluster (``ray.cluster_utils.Cluster``): a node leaves mid-job.

The removed node's raylet and worker processes die with it; the job must finish on the remaining
node with outputs byte-identical to a clean run.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from pipeline.worker import stats_path
from tests.test_pipeline_ray import (assert_no_partial_visible, assert_same_output, run_in_thread,
                                     sample_yaml, spec_for, wait_for)

pytestmark = pytest.mark.ray


@pytest.mark.timeout(300)
def test_node_removed_mid_job_completes(sample_dir, smoke_labels, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "object_store_memory": 100 << 20,
                                      "include_dashboard": False})
    try:
        node2 = cluster.add_node(num_cpus=1, object_store_memory=100 << 20)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.ERROR)
        out = tmp_path / "labels"
        spec = spec_for(sample_yaml(tmp_path, sample_dir), out, workers=2, sample_delay=0.3)
        nodes: dict[int, str] = {}
        shard_of: dict[int, str] = {}

        def on_event(kind, d):
            if kind == "actor_ready":
                nodes[d["index"]] = d["node_id"]
            elif kind == "shard_started":
                shard_of[d["index"]] = d["shard"]

        th, box = run_in_thread(spec, on_event)
        wait_for(lambda: len(shard_of) == 2 or "error" in box, 150, "both workers to start a shard")
        assert "error" not in box, box.get("error")
        # SPREAD placed one worker on each node
        assert sorted(nodes.values()) == sorted([cluster.head_node.node_id, node2.node_id])
        on_node2 = next(i for i, n in nodes.items() if n == node2.node_id)
        shard = shard_of[on_node2]
        wait_for(lambda: any((out / "seg").glob(f".{shard}.tar.tmp*")), 120, f"shard {shard} to start")
        time.sleep(1.0)
        assert not Path(stats_path(out, shard)).exists(), "shard finished before the node left; test is void"
        cluster.remove_node(node2)
        th.join(240)
        assert not th.is_alive(), "job did not finish after the node left"
        if "error" in box:
            raise box["error"]
        assert box["summary"]["processed"] == ["00000", "00001"]
        # the shard that was on the lost node was redone by a worker on the head node
        assert json.loads(Path(stats_path(out, shard)).read_text())["ok"] == 8
        assert_no_partial_visible(out)
        assert_same_output(out, smoke_labels)
    finally:
        ray.shutdown()
        cluster.shutdown()
