"""--dist fsdp: FSDP2 over 2 CPU processes (gloo) against 1 process with the same global batch, exact kill-and-resume,
2 -> 1 resume of a DCP checkpoint, writes from rank 0 only (DCP's own shards aside), damaged or unsafe checkpoints.

The 2-process runs are launched once per command by ``torch.distributed.run`` with this file as the worker
(``__main__`` below), which runs a list of runs in one process group and reports every file write of each rank.
Same global batch: 2 processes x grad_accum 1 against 1 process x grad_accum 2, so every micro-batch is the same
(the trainer draws global micro-batch rank * grad_accum + micro) and only the order of float reductions differs.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from worlds import EXECUTED, Payload, finetune_world

# float32 gradients summed in another order (measured: <= 1e-7 relative after 4 AdamW steps), 100x margin
TOL = dict(rel=1e-5, abs=1e-8)
TINY_PRETRAIN = dict(dim=16, depth=2, heads=2, mlp_dim=32, dropout=0.0, dec_dim=16, dec_heads=2, max_patches=40,
                     slides_per_step=2, eval_crops=1, queue=64, lr=3e-3, threads=1, steps=4, ckpt_every=2)
FINETUNE_LR = 3e-4
FINETUNE = dict(steps=4, batch_size=2, lr=FINETUNE_LR)


def small_finetune(dropout: float):
    """test_finetune's SMALL with two LLM layers (two FSDP units) and the given Q-Former and LoRA dropout."""
    from topopack.model.llm import LoraSettings, TinyLlamaConfig
    from topopack.model.qformer import QFormerConfig

    return dict(qformer_cfg=QFormerConfig(dim=16, num_queries=4, depth=1, heads=2, anchors=2, dropout=dropout),
                tiny=TinyLlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
                lora=LoraSettings(r=4, alpha=8, dropout=dropout))


def run_one(kind: str, spec: dict):
    """One run of a spec: {"data", "out", "kw", "stop_after", "resume", "encoder", "dropout"} in this process."""
    kw = dict(spec.get("kw", {}))
    if kind == "pretrain":
        from topopack.model.pretrain import pretrain

        stage = kw.pop("stage")
        return pretrain(stage, spec["data"], spec["out"], stop_after=spec.get("stop_after"),
                        resume=spec.get("resume", False), dist="fsdp", **{**TINY_PRETRAIN, **kw})
    from topopack.model.finetune import finetune

    train_kw = {"ckpt_every": 2, "dist": "fsdp", **kw}
    return finetune("vqa", spec["data"], spec["encoder"], spec["out"], stop_after=spec.get("stop_after"),
                    resume=spec.get("resume", False), train_kw=train_kw, **FINETUNE,
                    **small_finetune(spec.get("dropout", 0.0)))


def history(out) -> list[dict]:
    from topopack.model.distributed import TRAIN_STATE
    from topopack.model.trainer import DCP_CHECKPOINT, load_verified

    return load_verified(Path(out) / DCP_CHECKPOINT / TRAIN_STATE, {"history"})["history"]


def losses(out) -> list[float]:
    return [h["loss"] for h in history(out)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(kind: str, runs: list[dict], root: Path) -> dict[int, list[str]]:
    """Runs ``runs`` in 2 processes; returns the paths under ``root`` each rank wrote, created or removed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOPOPACK_CACHE": str(root / "cache"), "TOPOPACK_QUIET": "1"}
    spec = json.dumps({"kind": kind, "runs": runs, "root": str(root)})
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                           "--master-addr=127.0.0.1", f"--master-port={free_port()}", __file__, spec],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    writes = {int(m.group(1)): json.loads(m.group(2)) for m in re.finditer(r"^WRITES (\d) (.*)$", proc.stdout, re.M)}
    assert sorted(writes) == [0, 1], proc.stdout[-2000:]
    return writes


def dcp_tensors(out, shapes: dict) -> dict:
    """Tensors of a DCP checkpoint by their flat keys, e.g. {"model.queue": shape}."""
    import torch.distributed.checkpoint as dcp
    from topopack.model.trainer import DCP_CHECKPOINT

    state = {k: torch.zeros(shape, dtype=torch.long if k.endswith("_ptr") else torch.float32)
             for k, shape in shapes.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # reading alone, as meant
        dcp.load(state, checkpoint_id=Path(out) / DCP_CHECKPOINT)
    return state


def assert_weights_agree(a: dict, b: dict, lr: float):
    """Within a tenth of one AdamW step everywhere. Not tighter: an element whose gradient is float noise (a key
    bias, to which softmax is blind) takes noise-normalised steps, so it moves apart up to about lr / 50 here;
    a missing shard or an unsynchronised gradient moves by whole steps."""
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < lr / 10, worst


def relative_files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}


def assert_rank1_wrote_only_its_shards(writes: list[str], root: Path):
    """Rank 1 writes nothing but its DCP shard into a checkpoint's temporary directory (and creates it)."""
    shard = re.compile(r".*/checkpoint\.dcp\.\d+\.tmp(/__1_0\.distcp)?$")
    assert writes and all(shard.match(w) for w in writes), writes


# ---- finetune ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return finetune_world(tmp_path_factory.mktemp("dist_ft"))


@pytest.mark.usefixtures("one_thread")
def test_fsdp_finetune_matches_one_process_resumes_exactly_and_only_rank0_writes(world, monkeypatch):
    root, data, enc = world
    monkeypatch.setenv("TOPOPACK_CACHE", str(root / "cache"))
    base = {"data": str(data), "encoder": str(enc)}
    d = {name: root / name for name in ("two", "two_drop", "cut_drop", "cut", "one", "cut_1")}
    writes = launch("finetune", [
        {**base, "out": str(d["two"])},
        {**base, "out": str(d["two_drop"]), "dropout": 0.1},
        {**base, "out": str(d["cut_drop"]), "dropout": 0.1, "stop_after": 3},
        {**base, "out": str(d["cut"]), "stop_after": 2},
        {**base, "out": str(d["cut_drop"]), "dropout": 0.1, "resume": True},
    ], root)
    # the same global batch in one process: the same losses up to float reduction order
    run_one("finetune", {**base, "out": str(d["one"]), "kw": {"grad_accum": 2}})
    two, one = losses(d["two"]), losses(d["one"])
    assert one == pytest.approx(two, **TOL)
    assert two[0] == one[0]  # the first step's forward sees the same weights and data: bit for bit
    # killed after step 3 (checkpoint at step 2), resumed on 2 processes: exactly the uninterrupted run (dropout on)
    assert losses(d["cut_drop"]) == losses(d["two_drop"])
    # the 2-process checkpoint at step 2 continues on 1 process with grad_accum 2: the same run
    shutil.copytree(d["cut"], d["cut_1"])
    run_one("finetune", {**base, "out": str(d["cut_1"]), "kw": {"grad_accum": 2, "allow_changed": ["grad_accum"]},
                         "resume": True})
    assert losses(d["cut_1"]) == pytest.approx(two, **TOL) and losses(d["cut_1"])[:2] == two[:2]
    # files: what a 1-process run writes, plus rank 1's DCP shard; rank 1 wrote nothing else
    assert relative_files(d["two"]) == relative_files(d["one"]) | {"checkpoint.dcp/__1_0.distcp"}
    assert "checkpoint.dcp/__0_0.distcp" in relative_files(d["one"]) and (d["two"] / "adapter").is_dir()
    assert_rank1_wrote_only_its_shards(writes[1], root)
    # the model directory rank 0 saved after training holds the full trained weights
    from topopack.model.model_dir import load_model

    assert_weights_agree(*(load_model(d[k])[0].qformer.state_dict() for k in ("two", "one")), FINETUNE_LR)


# ---- pretrain ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    from topopack.model.synth import write_synthetic

    d = tmp_path_factory.mktemp("dist_slides")
    write_synthetic(d, 5, seed=3, min_patches=300, max_patches=400, dim=8, progress=False)
    return d


@pytest.mark.usefixtures("one_thread")
def test_fsdp_pretrain_matches_one_process_resumes_exactly_and_only_rank0_writes(slides, tmp_path):
    from topopack.model.encoder import load_encoder
    from topopack.model.moco import MoCoConfig

    d = {name: tmp_path / name for name in ("moco", "cut", "cut_1", "one", "mae", "mae_one")}
    moco = {"data": str(slides), "kw": {"stage": "moco"}}
    writes = launch("pretrain", [
        {**moco, "out": str(d["moco"])},
        {**moco, "out": str(d["cut"]), "stop_after": 3},
        {"copy": [str(d["cut"]), str(d["cut_1"])]},
        {**moco, "out": str(d["cut"]), "resume": True},
        {"data": str(slides), "kw": {"stage": "mae"}, "out": str(d["mae"])},
    ], tmp_path)
    two = losses(d["moco"])
    assert losses(d["cut"]) == two  # killed after step 3, resumed: exact
    run_one("pretrain", {**moco, "out": str(d["one"]), "kw": {"stage": "moco", "grad_accum": 2}})
    assert losses(d["one"]) == pytest.approx(two, **TOL) and losses(d["one"])[0] == two[0]
    run_one("pretrain", {**moco, "out": str(d["cut_1"]), "resume": True,
                         "kw": {"stage": "moco", "grad_accum": 2, "allow_changed": ["grad_accum"]}})
    assert losses(d["cut_1"]) == pytest.approx(two, **TOL) and losses(d["cut_1"])[:2] == two[:2]
    run_one("pretrain", {"data": str(slides), "kw": {"stage": "mae", "grad_accum": 2}, "out": str(d["mae_one"])})
    assert losses(d["mae_one"]) == pytest.approx(losses(d["mae"]), **TOL)
    # rank 0's encoder.pt holds the full trained encoder; MoCo's queue got the keys of both ranks, in rank order
    assert_weights_agree(*(load_encoder(d[k] / "encoder.pt").state_dict() for k in ("moco", "one")),
                         TINY_PRETRAIN["lr"])
    qa, qb = (dcp_tensors(d[k], {"model.queue": (TINY_PRETRAIN["queue"], MoCoConfig.proj_dim), "model.queue_ptr": ()})
              for k in ("moco", "one"))
    assert int(qa["model.queue_ptr"]) == int(qb["model.queue_ptr"]) > 0
    torch.testing.assert_close(qa["model.queue"], qb["model.queue"], rtol=1e-3, atol=1e-5)
    assert relative_files(d["moco"]) == relative_files(d["one"]) | {"checkpoint.dcp/__1_0.distcp"}
    assert_rank1_wrote_only_its_shards(writes[1], tmp_path)
    # both encoders' weights were sharded over the 2 ranks (the key encoder too), MAE's 0-dim pos_gain replicated
    chunks = {**stored_chunks(d["moco"]), **stored_chunks(d["mae"])}
    assert chunks["model.key_encoder.blocks.1.mlp.0.weight"] == chunks["model.encoder.blocks.1.mlp.0.weight"] == 2
    assert chunks["model.pos_gain"] == chunks["model.queue"] == 1


def stored_chunks(out) -> dict[str, int]:
    """Pieces each tensor of a DCP checkpoint is stored in: one per rank when it was sharded."""
    from topopack.model.distributed import _MetadataUnpickler
    from topopack.model.trainer import DCP_CHECKPOINT

    with open(Path(out) / DCP_CHECKPOINT / ".metadata", "rb") as f:
        meta = _MetadataUnpickler(f).load()
    return {k: len(v.chunks) for k, v in meta.state_dict_metadata.items()}


def test_shard_units():
    """Pretraining shards every transformer block (MoCo's key encoder too: its momentum update is elementwise, so
    each rank updates its own shard from the same shard of the online encoder); finetuning the LLM's decoder
    layers under peft."""
    from topopack.model.distributed import decoder_layers, encoder_blocks
    from topopack.model.encoder import SlideEncoder, SlideEncoderConfig
    from topopack.model.llm import add_lora, build_default_llm, build_tokenizer
    from topopack.model.mae import MAE, MAEConfig
    from topopack.model.moco import MoCo, MoCoConfig

    enc = SlideEncoder(SlideEncoderConfig(in_dim=8, dim=8, depth=2, heads=2, mlp_dim=8))
    moco = MoCo(enc, MoCoConfig(queue=8, proj_dim=4))
    assert encoder_blocks(moco) == [*enc.blocks, *moco.key_encoder.blocks]
    mae = MAE(enc, MAEConfig(dec_dim=8, dec_depth=1, dec_heads=2))
    assert encoder_blocks(mae) == [*enc.blocks, *mae.dec_blocks]
    small = small_finetune(0.0)
    llm = build_default_llm(build_tokenizer(["a b"]), small["tiny"])
    layers = list(llm.model.layers)
    assert decoder_layers(add_lora(llm, small["lora"])) == layers and len(layers) == 2
    with pytest.raises(ValueError, match="no decoder layers.*--dist ddp"):
        decoder_layers(enc)


# ---- DCP checkpoints in one process (--dist fsdp) ---------------------------------------------------
def toy_run(out, *, steps=6, stop_after=None, model=None, loss=None, **kw):
    from test_trainer import Toy, loss_fn, make_batch
    from topopack.model.trainer import TrainConfig, run_training

    torch.manual_seed(0)
    cfg = TrainConfig(out=str(out), steps=steps, lr=1e-2, ckpt_every=2, dist=kw.pop("dist", "fsdp"), **kw)
    return run_training(cfg, model or Toy(), loss or loss_fn, make_batch, run_config={"model": "toy"},
                        stop_after=stop_after)


def test_a_parameter_without_gradient_resumes_without_optimiser_state(tmp_path):
    """A trainable parameter no step has used yet (the blind control's Q-Former) has no AdamW state in the
    checkpoint and gets none on resume: it first trains after the resume point exactly as in the uninterrupted
    run (with state made up at loading, its step count and so its bias correction would be off)."""
    from test_trainer import Toy

    def toy():
        torch.manual_seed(0)
        model = Toy()
        model.late = torch.nn.Linear(8, 1)
        return model

    def loss(model, batch, step):
        extra = model.late(batch[0]).square().mean() if step >= 4 else 0.0
        return model(batch) + extra, {}

    full_model, resumed = toy(), toy()
    toy_run(tmp_path / "full", model=full_model, loss=loss)
    toy_run(tmp_path / "cut", model=toy(), loss=loss, stop_after=3)
    toy_run(tmp_path / "cut", model=resumed, loss=loss, resume=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    assert torch.equal(full_model.late.weight, resumed.late.weight)


def test_a_save_killed_half_way_never_counts(tmp_path, monkeypatch):
    """Killed after DCP wrote the shards of step 4 but before the train state and the rename: the step-2
    checkpoint stays the checkpoint, the leftover goes at the next start, and the resumed run is exact."""
    import torch.distributed.checkpoint as dcp

    full = toy_run(tmp_path / "full")
    real_save = dcp.save

    def killed(state, *, checkpoint_id, **kw):
        real_save(state, checkpoint_id=checkpoint_id, **kw)
        if str(checkpoint_id).endswith(".4.tmp"):
            raise KeyboardInterrupt

    monkeypatch.setattr(dcp, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        toy_run(tmp_path / "cut")
    monkeypatch.setattr(dcp, "save", real_save)
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["checkpoint.dcp", "checkpoint.dcp.4.tmp"]
    assert history(tmp_path / "cut")[-1]["step"] == 2
    resumed = toy_run(tmp_path / "cut", resume=True)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["checkpoint.dcp"]


def test_killed_between_the_two_renames_resumes_from_the_previous(tmp_path):
    full = toy_run(tmp_path / "full")
    toy_run(tmp_path / "cut", stop_after=3)
    os.replace(tmp_path / "cut" / "checkpoint.dcp", tmp_path / "cut" / "checkpoint.dcp.prev")
    resumed = toy_run(tmp_path / "cut", resume=True)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["checkpoint.dcp"]


def _zero_bytes(path: Path):
    raw = bytearray(path.read_bytes())
    at = len(raw) // 2
    assert any(raw[at:at + 8])
    raw[at:at + 8] = bytes(8)
    path.write_bytes(bytes(raw))




def _unsafe_metadata(path: Path):
    import pickle

    path.write_bytes(pickle.dumps(Payload()))


DAMAGE = {"shard bytes zeroed": ("__0_0.distcp", _zero_bytes, "checksum mismatch"),
          "shard missing": ("__0_0.distcp", Path.unlink, "missing or unexpected"),
          "train state truncated": ("train_state.pt", lambda p: p.write_bytes(p.read_bytes()[:100]), "damaged"),
          "metadata with code": (".metadata", _unsafe_metadata, "checksum mismatch")}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_dcp_checkpoint_is_named_with_the_fix(tmp_path, damage):
    name, spoil, problem = DAMAGE[damage]
    toy_run(tmp_path, stop_after=2)
    spoil(tmp_path / "checkpoint.dcp" / name)
    with pytest.raises(ValueError, match=f"checkpoint.dcp.*{problem}.*--overwrite"):
        toy_run(tmp_path, resume=True)
    assert EXECUTED == []


def test_dcp_metadata_is_read_without_running_its_code(tmp_path):
    """A checkpoint whose manifest was rewritten to match a .metadata that pickles a call: refused unread."""
    from topopack.model.distributed import TRAIN_STATE, _manifest
    from topopack.model.trainer import load_verified

    toy_run(tmp_path, stop_after=2)
    ckpt = tmp_path / "checkpoint.dcp"
    _unsafe_metadata(ckpt / ".metadata")
    state = load_verified(ckpt / TRAIN_STATE, set())
    torch.save({**state, "files": _manifest(ckpt)}, ckpt / TRAIN_STATE)
    with pytest.raises(ValueError, match=r"\.metadata: cannot be loaded safely.*not allowed.*--overwrite"):
        toy_run(tmp_path, resume=True)
    assert EXECUTED == []


def test_resume_with_the_other_dist_names_it_and_overwrite_replaces(tmp_path):
    toy_run(tmp_path, stop_after=2)
    with pytest.raises(FileNotFoundError, match="checkpoint.pt; OUT holds checkpoint.dcp of a --dist fsdp run"):
        toy_run(tmp_path, resume=True, dist="ddp")
    with pytest.raises(FileExistsError, match="checkpoint.dcp.*--overwrite"):
        toy_run(tmp_path, dist="ddp")
    toy_run(tmp_path, dist="ddp", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


# ---- the worker --------------------------------------------------------------------------------------
WRITE_EVENTS = {"os.mkdir", "os.remove", "os.rename", "os.rmdir", "shutil.rmtree", "os.truncate", "os.symlink"}


def _worker(spec: dict) -> None:
    import torch.distributed as dist

    root = spec["root"]
    rank = int(os.environ["RANK"])
    wrote: list[str] = []

    def audit(event, args):
        if event == "open" and args and isinstance(args[0], (str, os.PathLike)):
            mode, flags = args[1], args[2]
            if not (isinstance(mode, str) and set(mode) & set("wax+")) and not (
                    isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
                return
        elif event not in WRITE_EVENTS:
            return
        paths = [os.path.abspath(a) for a in args[:2] if isinstance(a, (str, os.PathLike))]
        wrote.extend(p for p in paths if p.startswith(root))  # the summary cache included: rank 0 fills it

    # one process group for all runs: pretrain ends its own, and a gloo group made a third time in a process hangs
    dist.destroy_process_group = lambda *a, **k: None
    sys.addaudithook(audit)
    for run in spec["runs"]:
        if "copy" in run:
            if rank == 0:
                shutil.copytree(*run["copy"])
            dist.barrier()
            continue
        run_one(spec["kind"], run)
    for r in range(dist.get_world_size()):  # one at a time: long lines from two processes interleave
        if r == rank:
            print(f"WRITES {rank} {json.dumps(sorted(set(wrote)))}", flush=True)
        dist.barrier()


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
