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
