"""The job's resource plan against the cluster, checked before any work (issue 9: a one-CPU
cluster deadlocked). Hand-built plans and cluster dicts."""
import pytest

from breakscene.errors import BreakSceneError
from batchjob.cluster import fit_plan, minimum, stage_plan


def _plan(seg_gpus=0.0, ext_gpus=0.0, seg_actors=1, ext_actors=1):
    return stage_plan(segment_gpus=seg_gpus, extract_gpus=ext_gpus, segment_actors=seg_actors,
                      extract_actors=ext_actors)


def test_minimum_is_one_actor_per_pool_plus_the_largest_task():
    plan = _plan(seg_gpus=0.25, ext_gpus=1.0, seg_actors=2, ext_actors=8)
    assert minimum(plan, "num_cpus") == 0.5 + 1.0 + 0.25
    assert minimum(plan, "num_gpus") == 1.25


def test_a_stage_with_no_actors_does_not_run_and_needs_nothing():
    plan = _plan(ext_gpus=1.0, ext_actors=0)  # a score-only run: no extraction
    assert minimum(plan, "num_cpus") == 0.5 + 0.25 and minimum(plan, "num_gpus") == 0.0
    assert fit_plan(plan, {"CPU": 1.0}) == (plan, [])


def test_a_plan_that_fits_is_left_alone():
    plan = _plan()
    fitted, notes = fit_plan(plan, {"CPU": 2.0})
    assert fitted == plan and notes == []
    fitted, notes = fit_plan(_plan(0.25, 1.0), {"CPU": 16.0, "GPU": 1.25})
    assert fitted["extract"]["num_gpus"] == 1.0 and notes == []


def test_one_cpu_scales_the_actor_shares_into_the_room_beside_the_largest_task():
    fitted, notes = fit_plan(_plan(), {"CPU": 1.0})
    cpus = {name: s["num_cpus"] for name, s in fitted.items()}
    # 1.75 CPUs asked for, 1 available: tasks keep 0.25, the two actors share 0.75 (x 0.5)
    assert cpus == {"load": 0.25, "segment": 0.25, "score": 0.25, "extract": 0.5}
    assert minimum(fitted, "num_cpus") == 1.0
    assert len(notes) == 1 and "1 CPU(s)" in notes[0] and "1.75" in notes[0] and "scaled by 0.500" in notes[0]
    assert fitted["extract"]["actors"] == 1 and fitted["load"]["actors"] is None
    fitted, _ = fit_plan(_plan(), {"CPU": 1.5})  # x (1.25 / 1.5), floored to Ray's 1e-4 unit
    assert (fitted["segment"]["num_cpus"], fitted["extract"]["num_cpus"]) == (0.4166, 0.8333)


def test_ray_datas_whole_cpu_repartition_leaves_actors_unreserved_on_one_cpu():
    plan = stage_plan(segment_gpus=0.0, extract_gpus=0.0, segment_actors=2, extract_actors=4, repartition_cpus=1.0)
    assert minimum(plan, "num_cpus") == 2.5
    fitted, notes = fit_plan(plan, {"CPU": 1.0})
    assert fitted["repartition"]["num_cpus"] == 1.0  # Ray Data's own: unchanged
    assert [(fitted[n]["num_cpus"], fitted[n]["actors"]) for n in ("segment", "extract")] == [(0.0, 1), (0.0, 1)]
    assert "actors run without a CPU share, one per pool" in notes[0]
    fitted, _ = fit_plan(plan, {"CPU": 2.0})  # room 1 beside the repartition: 0.5 + 1 scaled by 2/3
    assert (fitted["segment"]["num_cpus"], fitted["extract"]["num_cpus"], fitted["extract"]["actors"]) == \
        (0.3333, 0.6666, 4)
    with pytest.raises(BreakSceneError, match="repartition tasks ask for 1 CPU.*has 0.5"):
        fit_plan(plan, {"CPU": 0.5})


def test_a_task_larger_than_the_cluster_is_capped_and_actors_keep_their_shares():
    plan = stage_plan(segment_gpus=0.0, extract_gpus=0.0, segment_actors=1, extract_actors=1, load_cpus=4.0)
    fitted, notes = fit_plan(plan, {"CPU": 8.0})
    assert fitted["load"]["num_cpus"] == 4.0 and notes == []  # 5.5 fits in 8
    fitted, notes = fit_plan(plan, {"CPU": 2.0})
    # the load task is capped at the cluster's 2 CPUs; nothing is left beside it for the actors
    assert fitted["load"]["num_cpus"] == 2.0
    assert [(fitted[n]["num_cpus"], fitted[n]["actors"]) for n in ("segment", "extract")] == [(0.0, 1), (0.0, 1)]


def test_missing_gpus_stop_the_job_naming_them():
    with pytest.raises(BreakSceneError) as err:
        fit_plan(_plan(seg_gpus=0.25, ext_gpus=1.0), {"CPU": 8.0})
    message = str(err.value)
    assert "needs at least 1.25 GPU(s)" in message and "one extract actor 1" in message
    assert "one segment actor 0.25" in message and "the cluster has 0" in message and "\n" not in message
    with pytest.raises(BreakSceneError, match="needs at least 2 GPU"):
        fit_plan(_plan(ext_gpus=2.0), {"CPU": 8.0, "GPU": 1.0})


def test_an_autoscaling_cluster_is_not_judged_by_its_present_size():
    plan = _plan(ext_gpus=1.0)
    assert fit_plan(plan, {"CPU": 1.0}, autoscaling=True) == (plan, [])


def test_a_cluster_without_cpus_is_an_error():
    with pytest.raises(BreakSceneError, match="has no CPU"):
        fit_plan(_plan(), {"GPU": 1.0})
