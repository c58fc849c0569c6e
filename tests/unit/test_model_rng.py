"""No process-global RNG in the model: initial weights and in-batch ITM negatives come from generators seeded by the
caller, so two stages training in threads of one process (the Prefect route) cannot perturb each other."""
import threading

import torch

from flava.model import FlavaForPretraining, preset
from tests.unit.test_model import make_batch


def _same(a: FlavaForPretraining, b: FlavaForPretraining) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_initial_weights_do_not_depend_on_the_global_rng():
    torch.manual_seed(1)
    a = FlavaForPretraining(preset("tiny"), seed=5)
    torch.manual_seed(2)
    torch.rand(1000)
    b = FlavaForPretraining(preset("tiny"), seed=5)
    assert _same(a, b)
    assert not _same(a, FlavaForPretraining(preset("tiny"), seed=6))


def test_every_parameter_is_drawn_from_the_seed():
    """Nothing keeps torch's constructor-time (global RNG) initialisation: reset_parameters covers every tensor."""
    model = FlavaForPretraining(preset("tiny"), seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    for module in model.modules():  # re-randomise everything from the global RNG ...
        if hasattr(module, "reset_parameters") and module is not model:
            module.reset_parameters()
    for param in model.parameters():
        torch.nn.init.normal_(param)
    model.reset_parameters()  # ... and the seed alone brings every tensor back
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_models_built_concurrently_in_threads_are_identical():
    built: dict[int, list[FlavaForPretraining]] = {0: [], 1: []}
    start = threading.Barrier(2)

    def work(index: int) -> None:
        start.wait()
        for _ in range(3):
            built[index].append(FlavaForPretraining(preset("tiny"), seed=11))

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    models = built[0] + built[1]
    assert len(models) == 6 and all(_same(models[0], m) for m in models[1:])


def test_itm_negatives_come_from_the_models_generator_not_the_global_rng():
    cfg = preset("tiny", {"loss": {"itm_negative_prob": 0.5}})
    model = FlavaForPretraining(cfg, seed=3).eval()
    batch = make_batch(cfg, "pair", batch_size=8)
    with torch.no_grad():
        model.itm_generator.manual_seed(9)
        torch.manual_seed(1)
        a = model(batch).losses
        model.itm_generator.manual_seed(9)
        torch.manual_seed(2)
        b = model(batch).losses
        c = model(batch).losses  # the generator moved on: other negatives
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["itm"], c["itm"])
