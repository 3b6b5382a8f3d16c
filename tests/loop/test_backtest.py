import json
from collections import Counter

from lab_io.ground_truth import GroundTruth
from lab_io.virtual_library import enumerate_library
from loop.backtest import BacktestConfig, plot_curves, run_backtest


def test_tiny_backtest_shape_and_monotone_curves(tmp_path):
    config = BacktestConfig(n_compounds=120, n_rounds=2, batch_wells=36, n_seeds=2, policies=("loop", "random"),
                            assay=dict(n_members=2, n_steps=40, hidden_dim=32, batch_size=128),
                            lab=dict(image_size_px=96, cells_per_field=10.0), lab_world_seed=1)
    result = run_backtest(config)
    json.dumps(result)
    assert result["n_actives"] > 0
    # the library is screened in the chosen world: per-class counts of its actives, straight from the truth
    truth = GroundTruth(world_seed=1).for_smiles(enumerate_library(120, seed=0)["smiles"].tolist())
    assert result["actives_per_class"] == dict(Counter(truth.loc[truth["is_active"], "phenotype_class"]))
    assert sum(result["actives_per_class"].values()) == result["n_actives"]
    for name in ("loop", "random"):
        curve = result["policies"][name]
        assert len(curve["hit_fraction_mean"]) == len(curve["hit_fraction_sd"]) == 2
        for per_seed in curve["per_seed"]:
            assert 0 <= per_seed[0] <= per_seed[1] <= 1
        assert all(0 <= c <= 4 for c in curve["classes_found_mean"])
    assert plot_curves(result, tmp_path / "curves.png").stat().st_size > 1000


def test_backtest_curves_are_the_seed_mean_and_sample_sd(tmp_path, monkeypatch):
    """Aggregation closed form, the campaigns replaced by fixed curves: per round, the mean over seeds
    and the sample sd (ddof 1) of the fractions found and of the classes found."""
    import numpy as np

    import loop.backtest as bt

    per_seed = {0: [0.25, 0.5], 1: [0.5, 1.0], 2: [0.0, 0.75]}
    classes = {0: [1, 2], 1: [2, 4], 2: [0, 3]}
    monkeypatch.setattr(bt, "library_template", lambda path, config: path)
    monkeypatch.setattr(bt, "ground_truth_actives", lambda template, config: {"a": "x", "b": "y", "c": "x", "d": "z"})
    monkeypatch.setattr(bt, "_run_campaign", lambda template, run_dir, policy, seed, config, actives:
                        (list(per_seed[seed]), list(classes[seed])))
    result = run_backtest(BacktestConfig(n_rounds=2, n_seeds=3, policies=("random",)), work_dir=tmp_path)
    curve = result["policies"]["random"]
    assert curve["hit_fraction_mean"] == [0.25, 0.75]
    assert np.allclose(curve["hit_fraction_sd"], [0.25, 0.25])  # deviations (0, .25, -.25): sqrt(0.125 / 2)
    assert curve["per_seed"] == [per_seed[s] for s in range(3)]
    assert np.allclose(curve["classes_found_mean"], [1.0, 3.0])
    assert np.allclose(curve["classes_found_sd"], [1.0, 1.0])
    assert result["n_actives"] == 4 and result["actives_per_class"] == {"x": 2, "y": 1, "z": 1}


def test_each_seed_and_round_proposes_and_measures_with_its_own_seed(monkeypatch, tmp_path):
    """Seeds differ between the campaigns of a backtest and between their rounds (else every seed
    repeats one campaign and the sd over seeds is 0), and repeat for the same (seed, round)."""
    from types import SimpleNamespace

    import loop.backtest as bt

    calls = []
    monkeypatch.setattr(bt, "propose", lambda campaign, wells, policy, seed: (
        calls.append(("propose", seed)), SimpleNamespace(out_dir=tmp_path))[1])
    monkeypatch.setattr(bt, "run_synthetic_lab", lambda plates, results, campaign, seed, write_images: (
        calls.append(("lab", seed)), [])[1])
    monkeypatch.setattr(bt, "ingest_results", lambda campaign, results_dir: [])
    campaign = SimpleNamespace(root=tmp_path)
    seeds = {}
    for seed in range(3):
        for round_index in (1, 2, 3):
            calls.clear()
            bt.run_round(campaign, round_index, 96, "random", seed)
            assert [kind for kind, _ in calls] == ["propose", "lab"]
            seeds[(seed, round_index)] = tuple(s for _, s in calls)
    assert len({s[0] for s in seeds.values()}) == 9  # a proposal seed per (seed, round)
    assert len({s[1] for s in seeds.values()}) == 9  # a lab seed per (seed, round)
    calls.clear()
    bt.run_round(campaign, 2, 96, "random", 1)
    assert tuple(s for _, s in calls) == seeds[(1, 2)]
