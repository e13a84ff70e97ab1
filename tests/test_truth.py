"""Every switch does what its name says, and the report says only what the data show.

One test per finding of the "ablations that cannot lie" review; each failed on the code before
it. Small data made here; the report tests write synthetic sweeps through the real store.
"""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
import torch

from ablations.report import build_report
from ablations.store import ResultStore, read_results
from hardmix import HardMix
from hardmix.config import AugmentConfig, ConfigError, RunConfig, load_config
from hardmix.hardness import history_hard
from hardmix.methods import active_fields, effective_augment
from results_fixtures import config, write_run


def _logits(b: int, classes: int, wrong: torch.Tensor, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (b,), generator=g)
    logits = torch.randn(b, classes, generator=g)
    logits[torch.arange(b), y] += torch.where(wrong, -10.0, 10.0)
    return logits, y


# ---- 1. min_hard and top-k criteria ---------------------------------------------------------


@pytest.mark.parametrize("fallback", ["random", "skip", "topk_loss"])
def test_topk_criterion_never_falls_back_whatever_min_hard_says(fallback):
    """k = 0.1 of a batch of 64 with min_hard 8 (the quickstart's): the top-k set always has
    its 6 samples, so no fallback fires, sources are exactly that set, and mixing happens."""
    b = 64
    x = torch.randn(b, 3, 8, 8)
    mix = HardMix(method="hardmix", criterion="topk_loss", k=0.1, min_hard=8, fallback=fallback,
                  seed=0)
    for step in range(5):
        logits, y = _logits(b, 10, torch.zeros(b, dtype=torch.bool), seed=step)
        out = mix(x.clone(), y, logits=logits)
        loss = torch.nn.functional.cross_entropy(logits, y, reduction="none")
        top = set(loss.topk(6).indices.tolist())
        assert out.stats["fallback"] == 0 and out.stats["n_hard"] == 6
        assert set(out.source_index.tolist()) == top  # not a permutation of the batch
        assert (out.lam < 1).any()  # skip would leave every lam at 1
    # ... and the report, validation and the sweep space agree: the fallback does not act
    assert "fallback" not in active_fields({"method": "hardmix", "criterion": "topk_loss"})
    assert "min_hard" not in active_fields({"method": "hardmix", "criterion": "low_margin"})
    eff = effective_augment(AugmentConfig(criterion="topk_loss", min_hard=8).__dict__)
    assert eff["fallback"] is None and eff["min_hard"] is None and eff["k"] == 0.25


def test_search_preset_never_samples_a_fallback_for_a_topk_criterion():
    from tune.space import ConditionalSpace
    import optuna

    from hardmix.config import SweepConfig

    cfg = load_config(SweepConfig, "search-hardmix")
    space = ConditionalSpace(cfg.space, cfg.run)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    kinds = set()
    for _ in range(60):
        t = study.ask()
        space(t)
        topk = t.params["augment.criterion"] in ("topk_loss", "low_margin")
        kinds.add(topk)
        if topk:
            assert "augment.fallback" not in t.params and "augment.min_hard" not in t.params
        else:
            assert "augment.fallback" in t.params
        study.tell(t, 1.0)
    assert kinds == {True, False}


# ---- 2. the cached signal cannot work with prob 1 ------------------------------------------------


def test_cached_signal_with_prob_one_is_a_config_error_not_plain_cutmix():
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, overrides=["augment.signal=cached", "augment.prob=1.0"])
    assert err.value.field == "augment.signal" and "prob < 1" in str(err.value)
    with pytest.raises(ConfigError, match="prob < 1"):
        HardMix(signal="cached", prob=1.0, dataset_size=10)
    # a method that has no signal does not care: set by hand, the signal is refused as a
    # field nothing reads, not by the prob rule
    with pytest.raises(ConfigError, match="augment.signal = 'cached': does not act with "
                                          "augment.method=cutmix"):
        load_config(RunConfig, overrides=["augment.method=cutmix", "augment.signal=cached",
                                          "augment.prob=1.0"])


# ---- 3. each method's paper box ---------------------------------------------------------------


def test_cutout_draws_one_square_per_image_by_default_as_its_paper():
    x = torch.ones(16, 1, 16, 16)
    out = HardMix(method="cutout", seed=3)(x.clone(), torch.zeros(16, dtype=torch.long))
    holes = (out.x == 0)[:, 0]
    assert len({tuple(h.flatten().tolist()) for h in holes}) > 1  # different squares
    for method, box in (("cutmix", "batch"), ("hardmix", "batch"), ("saliencymix", "batch"),
                        ("cutout", "sample")):
        assert effective_augment({**AugmentConfig().__dict__, "method": method})["box"] == box


def test_help_states_each_methods_paper_box(capsys):
    from hardmix.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "cutout" in text and "paper box: sample" in text and "paper box: batch" in text


# ---- 4. SaliencyMix with the authors' detector --------------------------------------------------


def test_fine_grained_saliency_is_opencvs_detector_and_is_recorded(tmp_path):
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2, "saliency"):
        pytest.skip("OpenCV without its contrib modules")
    from hardmix.mix import fine_grained_points

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g) * 0.1
    x[1, :, 20:24, 5:9] = 1.0
    points = fine_grained_points(x, 32, 32)
    det = cv2.saliency.StaticSaliencyFineGrained_create()
    for i in range(3):
        ok, sal = det.computeSaliency(np.ascontiguousarray(x[i].numpy().transpose(1, 2, 0)))
        want = np.unravel_index(np.argmax((sal * 255).astype("uint8")), sal.shape)
        assert tuple(points[:, i].tolist()) == tuple(int(v) for v in want)
    mix = HardMix(method="saliencymix", saliency="fine_grained", seed=0)
    out = mix(x.clone(), torch.tensor([0, 1, 2]))
    assert out.mixed and out.lam.shape == (3,)
    with pytest.raises(ConfigError, match="box=batch"):
        HardMix(method="saliencymix", saliency="fine_grained", box="sample")
    # recorded with the results: a column that is NULL where no saliency detector runs
    st = ResultStore(str(tmp_path / "s"))
    write_run(st, "sal", config(augment__method="saliencymix", augment__saliency="fine_grained"),
              top1=10.0)
    write_run(st, "cut", config(augment__method="cutmix", augment__saliency="fine_grained"),
              top1=10.0)
    t = read_results(str(tmp_path / "s")).trials.to_pandas().set_index("trial_id")
    assert t.loc["sal", "augment.saliency"] == "fine_grained"
    assert pd.isna(t.loc["cut", "augment.saliency"])


# ---- 5. the paper's own criterion: frequently misclassified --------------------------------------


def test_history_of_one_observation_is_the_misclassified_criterion():
    b = 16
    wrong = torch.rand(b, generator=torch.Generator().manual_seed(1)) < 0.4
    wrong[0] = True
    logits, y = _logits(b, 5, wrong)
    idx = torch.arange(b)
    hist = HardMix(criterion="history", history_window=1, history_min_wrong=1, dataset_size=b,
                   seed=0)
    mis = HardMix(criterion="misclassified", seed=0)
    a, c = hist(torch.randn(b, 3, 4, 4), y, logits=logits, index=idx), \
        mis(torch.randn(b, 3, 4, 4), y, logits=logits)
    assert int(a.stats["n_hard"]) == int(c.stats["n_hard"]) == int(wrong.sum())


def test_history_counts_the_last_observations_and_reads_a_rate_before_the_window_fills():
    b = 4
    idx = torch.arange(b)
    mix = HardMix(criterion="history", history_window=4, history_min_wrong=2, dataset_size=b,
                  seed=0)
    # never seen: hard
    assert mix.memory.history(idx, 4, 2).all()
    pattern = [[True, False, True, False],   # sample 0 wrong in obs 1, 3: 2 of 4 -> hard
               [True, False, False, False],  # sample 1 wrong once: 1 of 4 -> not hard
               [False, False, False, True],  # sample 2 wrong in the newest only -> not hard
               [True, True, True, True]]     # sample 3 always wrong -> hard
    for step in range(4):
        wrong = torch.tensor([pattern[i][step] for i in range(b)])
        logits, y = _logits(b, 3, wrong, seed=step)
        mix.memory.observe(logits, y, idx)
        if step == 0:  # one observation: a rate of 1 wrong in 1 >= 2/4 -> hard
            assert mix.memory.history(idx, 4, 2).tolist() == [True, True, False, True]
    assert mix.memory.history(idx, 4, 2).tolist() == [True, False, False, True]
    # the window slides: a fifth, correct observation drops sample 0's first wrong
    logits, y = _logits(b, 3, torch.tensor([False, False, False, True]), seed=9)
    mix.memory.observe(logits, y, idx)
    assert mix.memory.history(idx, 4, 2).tolist() == [False, False, False, True]
    bits = torch.tensor([0b1010, 0b1], dtype=torch.uint8)
    assert history_hard(bits, torch.tensor([4, 1], dtype=torch.uint8), 4, 2).tolist() == \
        [True, True]


def test_history_criterion_trains_and_reports_its_memory(tmp_path):
    from hardmix.train import train

    cfg = load_config(RunConfig, overrides=[
        "data.name=synthetic", "model.name=smallnet", "model.width=8", "data.batch_size=64",
        "optim.epochs=2", "output.progress=false", "augment.criterion=history",
        f"output.dir={tmp_path}"])
    seen = []

    class Rec:
        def on_run_start(self, cfg, info): pass
        def on_epoch_end(self, m, c): seen.append(m)
        def on_run_end(self, s): pass
        def on_mixed_preview(self, i): pass

    train(cfg, [Rec()], tmp_path / "h")
    assert seen[-1]["memory_seen"] == pytest.approx(1.0)  # forward probes observed every sample
    assert 0 < seen[-1]["hard_share"] < 1


# ---- 6-10. what the report is willing to say ---------------------------------------------------


def _study(tmp_path, arms: dict, seeds=(0, 1, 2), fallback_rate=None):
    st = ResultStore(str(tmp_path / "study"))
    for name, (changes, errs) in arms.items():
        fb = (fallback_rate or {}).get(name, 0.1)
        for seed, err in zip(seeds, errs):
            write_run(st, f"{name}-s{seed}", config(seed=seed, optim__epochs=3, **changes),
                      top1=err, fallback_rate=fb)
    return str(tmp_path / "study")


def test_identical_variants_and_switches_that_never_acted_are_left_out(tmp_path):
    """Three fallback variants that trained identically (fallback rate 0): flagged, out of the
    family, and the CutMix -> HardMix interval is the one of a family without them."""
    same = [27.0, 27.9, 27.5]
    arms = {"cutmix": (dict(augment__method="cutmix"), [28.0, 28.4, 27.9]),
            "random": (dict(augment__method="hardmix", augment__min_hard=8), same),
            "skip": (dict(augment__method="hardmix", augment__min_hard=8,
                          augment__fallback="skip"), same),
            "topk": (dict(augment__method="hardmix", augment__min_hard=8,
                          augment__fallback="topk_loss"), same)}
    rep = build_report(_study(tmp_path, arms, fallback_rate={n: 0.0 for n in arms}))
    flagged = set(rep.main_table.loc[rep.main_table["identical_to"] != "", "variant"])
    assert len(flagged) == 2
    members = [c for c in rep.contrasts if not c.excluded]
    assert len(members) == 1 and members[0].difference.m == 1  # CutMix -> HardMix alone
    excluded = [c.excluded for c in rep.contrasts if c.excluded]
    assert excluded and all("identically" in e or "never acted" in e for e in excluded)
    assert "[+0.00, +0.00]" not in rep.text and "Identical variants" in rep.text


def test_a_fallback_that_never_fired_is_not_a_finding(tmp_path):
    arms = {"random": (dict(augment__method="hardmix", augment__min_hard=8), [27.0, 27.9, 27.5]),
            "skip": (dict(augment__method="hardmix", augment__min_hard=8,
                          augment__fallback="skip"), [27.1, 27.7, 27.6])}
    rep = build_report(_study(tmp_path, arms, fallback_rate={"random": 0.0, "skip": 0.0}))
    (c,) = rep.contrasts
    assert c.excluded == "fallback never acted (fallback_rate 0 on both sides)"
    rep = build_report(_study(tmp_path / "b", arms, fallback_rate={"random": 0.2, "skip": 0.2}))
    assert not rep.contrasts[0].excluded


def test_differences_compare_only_matched_variants(tmp_path):
    """HardMix at prob 0.5 is never compared with CutMix at prob 1."""
    arms = {"cutmix1": (dict(augment__method="cutmix"), [28.0, 28.4, 27.9]),
            "hard05": (dict(augment__method="hardmix", augment__prob=0.5), [26.0, 26.1, 25.9])}
    rep = build_report(_study(tmp_path, arms))
    assert rep.differences == [] and not [c for c in rep.contrasts if not c.excluded]
    assert "no `cutmix` variant matches it on every shared factor" in rep.text


def test_one_interval_per_question_with_its_family_stated(tmp_path):
    arms = {"none": (dict(augment__method="none"), [30.0, 31.0, 29.5]),
            "cutmix": (dict(augment__method="cutmix"), [28.0, 28.4, 27.9]),
            "hardmix": (dict(augment__method="hardmix"), [27.0, 27.9, 27.5])}
    rep = build_report(_study(tmp_path, arms))
    pair = [c for c in rep.contrasts if c.difference.variant.startswith("hardmix")
            and c.difference.baseline.startswith("cutmix")][0].difference
    (diff,) = [c.difference for c in rep.differences if c.difference.variant == pair.variant]
    assert (diff.ci_low, diff.ci_high) == (pair.ci_low, pair.ci_high)
    assert "the 3 comparisons of all one-factor contrasts of this report; Bonferroni" in rep.text
    only = build_report(_study(tmp_path / "m", arms), family=["method"], correction="none")
    assert "each interval a per-comparison 95% interval for its own question" in only.text


def test_importance_is_not_printed_for_a_grid_or_too_few_trials(tmp_path):
    from ablations.importance import factor_importance

    arms = {"a": (dict(augment__method="hardmix"), [27.0, 27.9, 27.5]),
            "b": (dict(augment__method="hardmix", augment__alpha=0.5), [27.2, 27.1, 27.6])}
    rep = build_report(_study(tmp_path, arms))
    assert rep.tables["importance"].empty and "grid (or arms) design" in rep.text
    rows = pd.DataFrame([{**config(augment__alpha=a), "status": "completed", "epochs_run": 200,
                          "final_val_top1_err": 20 + a} for a in (0.2, 0.5, 1.0)])
    table, note = factor_importance(rows, ["augment.alpha"], "search")
    assert table.empty and "needs at least 20" in note
    rng = np.random.default_rng(0)
    rows = pd.DataFrame([{**config(augment__alpha=float(a), augment__prob=float(p)),
                          "status": "completed", "epochs_run": 200,
                          "final_val_top1_err": 20 + 5 * a + 0.1 * rng.normal()}
                         for a, p in zip(rng.uniform(0.1, 2, 30), rng.uniform(0.2, 1, 30))])
    table, note = factor_importance(rows, ["augment.alpha", "augment.prob"], "search", boot=20)
    assert list(table["factor"])[0] == "augment.alpha" and (table["n"] == 30).all()
    assert (table["ci_low"] <= table["importance"]).all() and "bootstrap" in note


def test_no_test_selected_number_anywhere(tmp_path):
    from ablations.store import trial_schema

    assert "best_top1_err" not in trial_schema().names
    arms = {"a": (dict(augment__method="cutmix"), [27.0, 27.9, 27.5])}
    import pyarrow as pa
    import pyarrow.parquet as pq

    st = ResultStore(str(tmp_path / "old"))
    write_run(st, "x", config(augment__method="cutmix"), top1=20.0)
    for f in (tmp_path / "old" / "trials").rglob("*.parquet"):  # as version 2 wrote it
        t = pq.read_table(f)
        t = t.set_column(t.column_names.index("schema_version"), "schema_version",
                         pa.array([2] * t.num_rows, pa.int64()))
        pq.write_table(t.append_column("best_top1_err", pa.array([12.0] * t.num_rows)), f)
    old = read_results(str(tmp_path / "old")).trials
    assert "best_top1_err" not in old.column_names and old.num_rows == 1
    rep = build_report(_study(tmp_path, arms))
    for df in rep.tables.values():
        assert not any("best_top1" in str(c) for c in df.columns)
    assert "best_top1" not in rep.text


def test_figures_share_one_colour_per_variant_and_label_their_bands(tmp_path):
    from ablations import plots

    arms = {"none": (dict(augment__method="none"), [30.0, 31.0, 29.5]),
            "cutmix": (dict(augment__method="cutmix"), [28.0, 28.4, 27.9])}
    rep = build_report(_study(tmp_path, arms))
    colors = plots.variant_colors(list(rep.main_table["variant"]))
    assert len(set(colors.values())) == len(colors)
    assert {"error_by_variant", "learning_curves", "contrasts"} <= set(rep.plots)
    assert "box" not in " ".join(rep.plots)  # points with intervals, not box plots


@pytest.mark.parametrize("criterion, panels", [("low_margin", 2), ("misclassified", 3)])
def test_hardness_figure_draws_only_what_the_variants_recorded(tmp_path, monkeypatch,
                                                               criterion, panels):
    """A top-k criterion has no fallback: its figure has no empty fallback-rate axis, and
    says so; a thresholded criterion keeps all three panels."""
    from ablations import plots

    figures, save = [], plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or save(fig, path))
    arms = {"hard": (dict(augment__method="hardmix", augment__criterion=criterion,
                          augment__k=0.25), [27.0, 27.5, 27.2])}
    rate = None if criterion == "low_margin" else 0.1
    build_report(_study(tmp_path, arms, fallback_rate={"hard": rate}))
    fig = next(f for f in figures if "Hard-source" in f.get_suptitle())
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == panels
    assert all(ax.lines for ax in fig.axes)  # no panel without a curve
    assert (panels == 2) == ("not recorded for these variants: fallback rate"
                             in fig.get_suptitle())


def test_report_states_what_every_trial_shares_and_only_where_it_acts(tmp_path):
    """The variant names show only what varies: the rest of the configuration is listed once,
    a method's own field under that method, and a field no trial reads (a multistep milestone
    under a cosine schedule, HardMix's criterion for CutMix) nowhere."""
    arms = {"cut": (dict(augment__method="cutmix", optim__schedule="cosine"), [28.0, 28.4, 27.9]),
            "hard": (dict(augment__method="hardmix", augment__criterion="low_margin",
                          augment__signal="cached", optim__schedule="cosine",
                          optim__milestones=[1, 2]), [27.0, 27.5, 27.2])}
    rep = build_report(_study(tmp_path, arms))
    assert set(rep.main_table["variant"]) == {"cutmix", "hardmix"}  # milestones split nothing
    got = {(s, f): v for s, f, v in rep.tables["settings"].itertuples(index=False)}
    assert got[("hardmix", "augment.criterion")] == "low_margin"
    assert got[("hardmix", "augment.signal")] == "cached"
    assert got[("all trials", "optim.schedule")] == "cosine"
    assert ("cutmix", "augment.criterion") not in got and ("cutmix", "augment.alpha") in got
    assert not any(f in ("optim.milestones", "optim.gamma", "seed") for _, f in got)
    # CIFAR arrays go through the device loader: its padding counts, a folder's resize does not
    assert ("all trials", "data.pad") in got and ("all trials", "data.image_size") not in got
    # a ResNet-18 reads its stem, not smallnet's width
    assert got[("all trials", "model.name")] == "resnet18"
    assert ("all trials", "model.stem") in got and ("all trials", "model.width") not in got
    assert "- all trials: data.name=cifar10" in rep.text
    assert "- hardmix: " in rep.text and "criterion=low_margin" in rep.text


def test_a_setting_only_some_trials_read_is_not_claimed_for_all(tmp_path):
    """Milestones shared by the multistep arm mean nothing to the cosine arm beside it."""
    arms = {"step": (dict(augment__method="cutmix", optim__schedule="multistep"), [28.0, 28.4]),
            "cos": (dict(augment__method="cutmix", optim__schedule="cosine"), [27.0, 27.5])}
    rep = build_report(_study(tmp_path, arms, seeds=(0, 1)))
    scopes = {f: s for s, f, _ in rep.tables["settings"].itertuples(index=False)}
    assert scopes["optim.milestones"] == "the trials that read it"
    assert scopes["optim.lr"] == "all trials" and "optim.schedule" not in scopes


# ---- 11. every augment field acts exactly where the method table says -------------------------

#: A value other than the default for each numeric ``augment`` field (a choice field takes every
#: other registered choice). Every field of AugmentConfig needs one, so a new field is tested too.
_OTHER_NUMBER = {"alpha": 0.3, "prob": 0.4, "k": 0.5, "min_hard": 1, "history_window": 2,
                 "history_min_wrong": 1, "cutout_size": 0.25}
_N, _B, _STEPS = 32, 16, 40


def _scenario():
    """32 noisy images of 5 class prototypes and a nearest-prototype classifier with BatchNorm
    (so ``bn_mode`` matters) and dropout: right on about 60% of them, so a batch has some hard
    samples and some easy ones, and a memory sees its samples change."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(5, 3, 8, 8, generator=g)
    y = torch.randint(0, 5, (_N,), generator=g)
    # Channels on unequal scales, and BatchNorm slow to learn them: its running statistics
    # (eval) and a batch's (train) weigh the channels differently, so bn_mode changes margins.
    scale = torch.tensor([1.0, 3.0, 0.3])[:, None, None]
    x = (mu[y] + 8 * torch.randn(_N, 3, 8, 8, generator=g)) * scale

    class Prototypes(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(3, momentum=0.01)
            self.drop = torch.nn.Dropout(0.3)
            self.w = torch.nn.Parameter(mu.flatten(1).clone())

        def forward(self, images):
            return self.drop(self.bn(images).flatten(1)) @ self.w.T / 20

    return x, y, Prototypes()


_DATA = _scenario()


def _trace(aug: dict) -> list:
    """What ``_STEPS`` training steps of HardMix ``aug`` produce (images, λ, sources, n_hard,
    fallback), the memory fed as train.py feeds it, on a fresh copy of the model."""
    import copy

    x, y, net = _DATA
    model = copy.deepcopy(net)  # the training forward moves BatchNorm's running statistics
    torch.manual_seed(1)
    mix = HardMix(num_classes=5, dataset_size=_N, seed=3, **aug)
    order = torch.Generator().manual_seed(5)
    steps = []
    for _ in range(_STEPS):
        idx = torch.randperm(_N, generator=order)[:_B]
        out = mix(x[idx].clone(), y[idx], model=model, index=idx)
        mix.observe(model(out.x).detach(), y[idx], idx, out)
        steps.append((out.mixed, out.x, out.lam, out.source_index,
                      float(out.stats["n_hard"]), float(out.stats["fallback"])))
    return steps


def _same(a: list, b: list) -> bool:
    return all(sa[0] == sb[0] and all(torch.equal(p, q) for p, q in zip(sa[1:4], sb[1:4]))
               for sa, sb in zip(a, b))


def _alternatives(name: str, value) -> list:
    import dataclasses

    meta = {f.name: f.metadata for f in dataclasses.fields(AugmentConfig)}[name]
    if meta["choices"] is not None:
        return [c for c in meta["choices"] if c != value]
    return [_OTHER_NUMBER[name]]


def _settings() -> list[dict]:
    """Every method at the paper's switches, and HardMix at every criterion x signal (x fallback,
    for a thresholded criterion): tests/method_settings.py, shared with the device tests."""
    from method_settings import method_settings

    return method_settings()


@pytest.mark.parametrize("setting", _settings(), ids=lambda s: "-".join(s.values()))
def test_every_augment_field_acts_exactly_where_the_method_table_says(setting):
    """Change one augment field at a time: the steps change if and only if the method table
    (``active_fields``) says the field acts for this setting. A switch that silently does
    nothing fails here, and so does an inert field that shifts the random stream (it would turn
    a NULL column of the results into a hidden seed)."""
    import dataclasses

    from hardmix.methods import CRITERIA, METHODS, resolved_box

    base = {"prob": 0.7, **setting}
    active = active_fields(base)
    if "min_hard" in active:
        # The fallback must fire on some mixed steps and not on others, or no fallback setting
        # could show itself: min_hard at the median hard count of a run that never falls back.
        counts = sorted(s[4] for s in _trace({**base, "min_hard": 1}) if s[0])
        base["min_hard"] = int(counts[len(counts) // 2])
        fired = [s[5] for s in _trace(base) if s[0]]
        assert 0 < sum(fired) < len(fired), (base, fired)
    reference = _trace(base)
    if METHODS[base["method"]].mixer != "none":
        assert any(s[0] for s in reference) and not all(s[0] for s in reference)
    criterion = CRITERIA[base.get("criterion", "misclassified")]
    if METHODS[base["method"]].hard and criterion.thresholded:
        assert len({s[4] for s in reference if s[0]}) > 1  # hard counts vary: a live criterion
    wrong = []
    for name in (f.name for f in dataclasses.fields(AugmentConfig)):
        if name == "method":
            continue
        value = base.get(name, getattr(AugmentConfig(), name))
        for other in _alternatives(name, value):
            variant = {**base, name: other}
            if name == "box" and resolved_box(variant) == resolved_box(base):
                continue  # auto is the method's own box: the same setting
            changed = not _same(_trace(variant), reference)
            if changed != (name in active):
                wrong.append(f"{name}={other!r} {'changed' if changed else 'did not change'} "
                             f"the steps, but the table says it is "
                             f"{'active' if name in active else 'inert'}")
    assert not wrong, wrong
