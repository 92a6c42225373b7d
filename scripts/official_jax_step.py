#!/usr/bin/env python3
"""Times the official JAX M3AE training step on the workload of `m3ae bench --workload preset`.

The official code is not part of this repository: pass the path of its `m3ae/model.py`
(https://github.com/young-geng/m3ae_public) with `--official`. This driver imports the model,
its losses and its train state from that file and builds the step of the official
`m3ae_main.py` around them: `model.apply` on the patches of the images (training mode, a fresh
masking key per step), the masked patch MSE plus `text_loss_weight` times the masked-token cross
entropy, `jax.value_and_grad`, and `optax.chain(clip_by_global_norm(1e9), adamw(b1 0.9, b2 0.95,
weight decay 0.05 with the model's no-decay list))`, jitted as one function. The inputs follow
`m3ae_train::bench::preset_workload`: uniform images and token ids, sample i padding its last
`i mod (T/2)` tokens, learning rate 1e-4.

    python3 scripts/official_jax_step.py --official /path/to/m3ae_public/m3ae/model.py \\
        --config configs/bench-cpu-bert.toml [--model text_vocab_size=1024] --steps 5
    python3 scripts/official_jax_step.py --official ... --preset small --model image_size=224 \\
        --batch 8 --steps 3

Run it on the cores `m3ae bench` uses (e.g. `taskset -c 0,1` for both) to compare the two.
It prints the median of the timed steps (after `--warmup` steps, the first of which compiles),
samples per second, and the user / system CPU time and minor page faults of the timed steps.
"""

import argparse
import importlib.util
import json
import os
import resource
import statistics
import sys
import time

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = None

# m3ae's model defaults (`M3aeConfig::default`), the fields the workload needs.
DEFAULTS = dict(
    emb_dim=1024,
    dec_emb_dim=512,
    depth=24,
    dec_depth=8,
    num_heads=16,
    dec_num_heads=16,
    mlp_ratio=4,
    output_head_depth=0,
    att_drop=0.0,
    drop=0.0,
    drop_path=0.0,
    image_mask_ratio=0.75,
    text_mask_ratio=0.75,
    use_type_embedding=True,
    model_type=None,
    patch_size=16,
    image_size=256,
    text_vocab_size=30522,
    text_length=64,
    image_output_dim=None,
    image_loss_weight=1.0,
    text_loss_weight=0.1,
    image_all_token_loss=False,
    text_all_token_loss=False,
)
# fields the official model takes in its `config_updates`
ARCH = (
    "emb_dim dec_emb_dim depth dec_depth num_heads dec_num_heads mlp_ratio output_head_depth "
    "att_drop drop drop_path image_mask_ratio text_mask_ratio use_type_embedding model_type"
).split()


def parse_value(text):
    text = text.strip()
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text.strip('"')


def workload(args):
    cfg = dict(DEFAULTS)
    batch = None
    if args.config:
        if tomllib is None:
            sys.exit("--config needs Python 3.11+ (tomllib)")
        with open(args.config, "rb") as f:
            doc = tomllib.load(f)
        model = doc.get("model", doc)
        unknown = set(model) - set(cfg) - {"kernels", "unpaired_text_loss_weight"}
        if unknown:
            sys.exit(f"{args.config}: fields this driver does not know: {sorted(unknown)}")
        cfg.update({k: v for k, v in model.items() if k in cfg})
        batch = doc.get("train", {}).get("batch_size")
    if args.preset:
        cfg["model_type"] = args.preset
    for spec in args.model:
        key, _, value = spec.partition("=")
        if key not in cfg:
            sys.exit(f"--model {spec}: unknown field {key!r}")
        cfg[key] = parse_value(value)
    cfg["mlp_ratio"] = int(cfg["mlp_ratio"])  # the official MLP width is emb_dim * mlp_ratio
    batch = args.batch or batch or 32
    return cfg, batch


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--official", required=True, help="path of the official m3ae/model.py")
    p.add_argument("--config", help="TOML with a [model] table (and train.batch_size)")
    p.add_argument("--preset", help="official model_type (small, base, large, huge)")
    p.add_argument("--model", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--batch", type=int)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    cfg, batch = workload(args)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import traverse_util

    spec = importlib.util.spec_from_file_location("official_m3ae_model", args.official)
    official = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(official)

    ps, side, t, vocab = cfg["patch_size"], cfg["image_size"], cfg["text_length"], cfg["text_vocab_size"]
    updates = {k: cfg[k] for k in ARCH if cfg[k] is not None}
    model = official.MaskedMultimodalAutoencoder(
        config_updates=updates,
        text_vocab_size=vocab,
        image_output_dim=cfg["image_output_dim"] or ps * ps * 3,
    )

    # the architecture the official code resolves (a model_type overrides the widths and depths)
    resolved = model.get_default_config(updates)
    cfg.update({k: resolved[k] for k in ARCH if k in resolved and resolved[k] is not None})

    rs = np.random.default_rng(args.seed)
    image = jnp.asarray(rs.uniform(-1.0, 1.0, (batch, side, side, 3)), jnp.float32)
    text = jnp.asarray(rs.integers(0, vocab, (batch, t)), jnp.int32)
    half = max(t // 2, 1)
    padding = jnp.asarray(
        [[1.0 if k >= t - (i % half) else 0.0 for k in range(t)] for i in range(batch)],
        jnp.float32,
    )

    key = jax.random.PRNGKey(args.seed)
    key, *init_keys = jax.random.split(key, 5)
    variables = model.init(
        dict(zip(("params", "noise", "drop_path", "dropout"), init_keys)),
        official.extract_patches(image, ps),
        text,
        padding,
        deterministic=False,
    )
    no_decay = set(model.no_decay_list())

    def decay_mask(params):
        flat = traverse_util.flatten_dict(params)
        return traverse_util.unflatten_dict(
            {path: not any(part in no_decay for part in path) for path in flat}
        )

    tx = optax.chain(
        optax.clip_by_global_norm(1e9),
        optax.adamw(learning_rate=1e-4, weight_decay=0.05, b1=0.9, b2=0.95, mask=decay_mask),
    )
    state = official.M3AETrainState.create(params=variables, tx=tx, apply_fn=None)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(variables))
    del variables

    def step(state, key, image, text, padding):
        key, k_noise, k_drop_path, k_dropout = jax.random.split(key, 4)

        def loss_fn(params):
            patches = official.extract_patches(image, ps)
            image_out, text_out, image_mask, text_mask = model.apply(
                params,
                patches,
                text,
                padding,
                deterministic=False,
                rngs=dict(noise=k_noise, drop_path=k_drop_path, dropout=k_dropout),
            )
            image_loss = official.patch_mse_loss(
                image_out, patches, None if cfg["image_all_token_loss"] else image_mask
            )
            text_valid = official.mask_intersection(
                official.all_mask(text) if cfg["text_all_token_loss"] else text_mask,
                official.mask_not(padding),
            )
            text_loss, text_acc = official.cross_entropy_loss_and_accuracy(text_out, text, text_valid)
            loss = cfg["image_loss_weight"] * image_loss + cfg["text_loss_weight"] * text_loss
            return loss, (image_loss, text_loss, text_acc)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads), key, loss, aux

    step = jax.jit(step, donate_argnums=(0,))

    times, losses = [], []
    usage0 = None
    t_all = time.perf_counter()
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            usage0 = resource.getrusage(resource.RUSAGE_SELF)
            t_timed = time.perf_counter()
        t0 = time.perf_counter()
        state, key, loss, aux = step(state, key, image, text, padding)
        jax.block_until_ready((state, loss))
        ms = (time.perf_counter() - t0) * 1e3
        losses.append(float(loss))
        if i >= args.warmup:
            times.append(ms)
        elif i == 0:
            compile_ms = ms
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter() - t_timed
    user = usage1.ru_utime - usage0.ru_utime
    system = usage1.ru_stime - usage0.ru_stime
    median = statistics.median(times)
    report = dict(
        workload="official jax m3ae step",
        config={k: v for k, v in cfg.items() if v is not None},
        batch=batch,
        parameters=n_params,
        steps=args.steps,
        step_ms=[round(x, 1) for x in times],
        median_ms=round(median, 1),
        samples_per_s=round(batch / (median / 1e3), 2),
        first_step_ms_with_compile=round(compile_ms, 1),
        losses=[round(x, 5) for x in losses],
        timed_cpu_s=dict(user=round(user, 3), system=round(system, 3), wall=round(wall, 3)),
        system_share_of_cpu=round(system / max(user + system, 1e-9), 4),
        minor_faults_per_step=round((usage1.ru_minflt - usage0.ru_minflt) / args.steps),
        peak_rss_mb=round(usage1.ru_maxrss / 1024, 1),
        jax=jax.__version__,
        devices=[str(d) for d in jax.devices()],
        cpus=sorted(os.sched_getaffinity(0)),
    )
    print(
        f"official step: median {median:.1f} ms over {args.steps} steps "
        f"({batch / (median / 1e3):.1f} samples/s), system {100 * report['system_share_of_cpu']:.1f}% "
        f"of CPU, peak RSS {report['peak_rss_mb']:.0f} MB"
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
