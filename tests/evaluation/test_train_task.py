"""The task trainer (`mmrec eval --task ... --train`) optimises as `mmrec train` does: the same
parameter groups and the same schedule, here with min_lr = 10% of lr."""

import json
import math
import random
from pathlib import Path

import pytest
import torch

from mm_rec import MMRecConfig, MMRecModel
from mm_rec.evaluation import train_task
from mm_rec.evaluation.train_task import TaskTrainConfig, train_on_task
from mm_rec.training import RunConfig, train

LR, WARMUP, STEPS = 3e-3, 3, 12


def tiny_model() -> MMRecModel:
    torch.manual_seed(0)
    return MMRecModel(MMRecConfig(vocab_size=256, hidden_dim=16, num_layers=1, num_heads=2, ffn_dim=24,
                                  num_memories=2, mem_dim=4, memory_size_M=3, chunk_size=4))


def task_learning_rates(monkeypatch, config: TaskTrainConfig) -> tuple[list[float], torch.optim.Optimizer]:
    """The learning rate of every step of train_on_task, read from its optimizer as each batch is drawn."""
    optimizers = []
    build = train_task.build_optimizer

    def recording(*args, **kwargs):
        optimizers.append(build(*args, **kwargs))
        return optimizers[-1]

    monkeypatch.setattr(train_task, "build_optimizer", recording)
    rates = []
    generator = torch.Generator().manual_seed(0)

    def next_batch():
        rates.append(optimizers[0].param_groups[0]["lr"])
        ids = torch.randint(0, 256, (2, 9), generator=generator)
        return ids[:, :-1], ids[:, 1:]

    train_on_task(tiny_model(), next_batch, lambda model: 0.0, config, log=None)
    return rates, optimizers[0]


def test_the_task_trainer_follows_the_main_trainers_schedule(monkeypatch, tmp_path):
    rates, optimizer = task_learning_rates(monkeypatch, TaskTrainConfig(steps=STEPS, lr=LR, warmup_steps=WARMUP,
                                                                        eval_every=STEPS))
    # mmrec train with the same peak, warmup and cosine length, min_lr = 10% of lr: the lr it logs
    text = tmp_path / "corpus.txt"
    text.write_text(Path(random.__file__).read_text()[:20000])
    sets = ["model.num_layers=1", "model.hidden_dim=16", "model.num_heads=2", "model.ffn_dim=24", "model.mem_dim=4",
            "model.memory_size_M=3", "model.chunk_size=4", "training.seq_len=16", "training.batch_size=2",
            "training.eval_interval=100", "training.eval_tokens=64", "training.sample_tokens=0",
            "training.tensorboard=false", f"training.lr={LR}", f"training.min_lr={LR / 10}",
            f"training.warmup_steps={WARMUP}", f"training.lr_decay_steps={STEPS}", "training.max_steps=8"]
    train(RunConfig.load(None, [f"data.path={text}", *sets]), tmp_path / "run", log=lambda *_: None)
    rows = [row for row in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
            if "loss" in row]
    assert [row["lr"] for row in rows] == rates[:8]
    # the shape: warmup from lr / 3 to the peak, then a cosine whose floor is 10% of the peak
    assert rates[0] == pytest.approx(LR / WARMUP) and rates[WARMUP - 1] == rates[WARMUP] == pytest.approx(LR)
    progress = (STEPS - 1 - WARMUP) / (STEPS - WARMUP)  # of the last step
    assert rates[-1] == pytest.approx(LR * (0.1 + 0.45 * (1 + math.cos(math.pi * progress))))
    # and the main trainer's parameter groups: weight decay on matrices only
    decays = {group["weight_decay"]: {p.dim() >= 2 for p in group["params"]} for group in optimizer.param_groups}
    assert decays == {0.1: {True}, 0.0: {False}}



def test_a_resumed_task_run_is_the_uninterrupted_run(tmp_path):
    """Stopped by its time budget after step 1 with its state written, then resumed in a fresh model and
    optimizer: the weights after the last step (bit for bit) and the curve from step 4 on are those of one
    uninterrupted run; the batch generator's state travels with it (a fresh generator would draw other
    batches), and so does the global one (dropout). A finished run and changed settings are refused."""
    def run(config, state_path=None, resume=False):
        model = tiny_model()
        for module in model.modules():  # dropout on: the global generator matters
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.1
        generator = torch.Generator().manual_seed(0)

        def next_batch():
            ids = torch.randint(0, 256, (2, 9), generator=generator)
            return ids[:, :-1], ids[:, 1:]

        data = train_task.BatchStream(next_batch, generator.get_state, generator.set_state)
        curve = train_on_task(model, data, lambda m: float(next(m.parameters()).detach().sum()), config, log=None,
                              state_path=state_path, resume=resume)
        return model, curve

    config = TaskTrainConfig(steps=6, lr=LR, warmup_steps=2, eval_every=2)
    whole_model, whole = run(config)
    state = tmp_path / "training_state.pt"
    _, first = run(TaskTrainConfig(steps=6, lr=LR, warmup_steps=2, eval_every=2, time_budget_s=1e-9), state)
    assert [p.step for p in first] == [1] and state.exists()
    resumed_model, resumed = run(config, state, resume=True)
    assert [p.step for p in resumed] == [1, 2, 4, 6]
    assert [(p.loss, p.accuracy) for p in resumed[2:]] == [(p.loss, p.accuracy) for p in whole[1:]]
    for a, b in zip(resumed_model.state_dict().values(), whole_model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="ended after its 6 steps"):
        run(config, state, resume=True)
    with pytest.raises(ValueError, match="settings differ in lr"):
        run(TaskTrainConfig(steps=6, lr=2 * LR, warmup_steps=2, eval_every=2), state, resume=True)
    with pytest.raises(ValueError, match="a BatchStream"):
        train_on_task(tiny_model(), lambda: None, lambda m: 0.0, config, state_path=state)
