"""Tiny model/optimiser/batch fixtures shared by the train-step tests and the multi-process worker."""

from __future__ import annotations

import importlib.util
import os
import socket

import numpy as np

from yolos_jax import losses, matcher, optim, sharding, train_step, weights
from yolos_jax.data import workdir_paths
from yolos_jax.config import model_config
from yolos_jax.yolos import YOLOS

IMAGE_HW = (48, 64)
NUM_CLASSES = 5
MAX_BOXES = 4


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def generate_demo_data(source_dir: str, arg: str = "smoke") -> str:
    """`configs/demo.py[:arg]`'s synthetic dataset written into `source_dir`, as a run writes it into its workdir:
    for tests whose runs share one dataset (`--config.input.source_dir=source_dir`; a run generates data only
    into a '{workdir}' path of its own). Returns source_dir."""
    spec = importlib.util.spec_from_file_location("demo_config", os.path.join(ROOT, "configs", "demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    input_cfg = demo.get_config(arg).input
    input_cfg.source_dir = "{workdir}"
    workdir_paths.resolve_input_config(input_cfg, str(source_dir))
    return str(source_dir)


def tiny_model() -> YOLOS:
    cfg = model_config(
        "s", hidden_size=32, depth=2, num_heads=2, num_det_tokens=6, num_classes=NUM_CLASSES,
        init_pe_size=(32, 48), mid_pe_size=(32, 48),
    )
    return YOLOS(**cfg.to_dict())


def fake_batch(batch_size: int, seed: int) -> dict:
    """A padded batch in the input schema: random images, 0..MAX_BOXES boxes per image, some padding."""
    rng = np.random.default_rng(seed)
    h, w = IMAGE_HW
    image = rng.normal(size=(batch_size, h, w, 3)).astype(np.float32)
    pixel_mask = np.ones((batch_size, h, w), bool)
    pixel_mask[::2, :, w - 16:] = False  # every other image is narrower (padded on the right)
    image[~pixel_mask] = 0.0
    counts = np.arange(batch_size) % (MAX_BOXES + 1)  # 0, 1, ..., MAX_BOXES targets
    box_mask = np.arange(MAX_BOXES)[None, :] < counts[:, None]
    centers = rng.uniform(0.25, 0.75, size=(batch_size, MAX_BOXES, 2))
    sizes = rng.uniform(0.1, 0.4, size=(batch_size, MAX_BOXES, 2))
    boxes = np.concatenate([centers, sizes], -1).astype(np.float32) * box_mask[..., None]
    labels = (rng.integers(0, NUM_CLASSES, size=(batch_size, MAX_BOXES)) * box_mask).astype(np.int32)
    return {"image": image, "pixel_mask": pixel_mask, "boxes": boxes, "labels": labels, "box_mask": box_mask}


def build_step(mesh_devices, fsdp: int = 1, total_steps: int = 10, global_batch: int = 8, policy: str = "stop",
               grad_accum_steps: int = 1, ema_decay: float = 0.0, loss_cfg=None):
    """(initial state, jitted step, mesh) for a mesh over `mesh_devices`."""
    model = tiny_model()
    mesh_cfg = sharding.default_mesh_config()
    mesh_cfg.fsdp = fsdp
    mesh_cfg.min_fsdp_size = 16
    mesh = sharding.make_mesh(mesh_cfg, mesh_devices)
    optim_cfg = optim.default_optim_config()
    optim_cfg.base_lr = 1e-3
    optim_cfg.warmup_steps = 2
    # Shapes and the state init under the mesh (`sharding.mesh_jit`), as trainer.py traces them: the model's
    # forward runs in both, and splash attention finds the mesh there.
    abstract_params = weights.abstract_params(model, IMAGE_HW, mesh)
    tx, schedule = optim.make_optimizer(optim_cfg, abstract_params, global_batch, total_steps)
    ema = ema_decay > 0
    _, shardings = train_step.abstract_state_and_shardings(model, tx, 0, IMAGE_HW, mesh, mesh_cfg, ema)
    state = sharding.mesh_jit(lambda: train_step.init_state(model, tx, 0, IMAGE_HW, ema), mesh,
                              out_shardings=shardings)()
    step = train_step.make_train_step(
        model, tx, schedule, loss_cfg or losses.default_loss_config(), matcher.default_matcher_config(), mesh,
        shardings, policy, grad_accum_steps=grad_accum_steps, ema_decay=ema_decay,
    )
    return state, step, mesh


def free_port() -> int:
    """A TCP port that was free just now on every address (multi-process tests' coordinator address; jax binds
    `[::]:port`), drawn below Linux's ephemeral range (32768-60999): the seconds until the coordinator binds it
    cannot be lost to another process's connection or bind-to-port-0, which the kernel serves from that range."""
    import errno
    import random

    draw = random.Random()  # its own state, from os.urandom: tests that seed `random` do not make workers collide
    for _ in range(200):
        port = draw.randrange(20000, 32000)
        try:
            with socket.socket() as s:
                s.bind(("0.0.0.0", port))
            try:
                with socket.socket(socket.AF_INET6) as s:
                    s.bind(("::", port))
            except OSError as e:  # a host without IPv6 is fine; a port in use is not
                if e.errno == errno.EADDRINUSE:
                    raise
            return port
        except OSError:  # in use: draw another
            continue
    raise RuntimeError("no free TCP port in 20000-31999")
