"""This project's segmentor checkpoint (model.safetensors): the deployed model's tensors, with its SegConfig and
extras (dataset, test scale, iterations, run id, ...) in the safetensors metadata, so that the file alone rebuilds
its model.

train.py writes one beside its train_state.pt and repairs it on --resume; weights.py's converter writes one from a
released DAFormer/MIC model; eval.py reads it, for its evaluation and predict.py's predictions. Loading is strict,
as for the official weights (files.check_keys).

Sections: 1. writing and reading the file; 2. train.py --resume: the model beside its training state.
"""
import json
import os
import pathlib
from dataclasses import asdict

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import files
import ssr
from files import WeightsError

# ----------------------------------------------------------------------------------------------------------------
# 1. Writing and reading the file: the tensors of the model's state dict, the SegConfig and extras in the metadata

FORMAT = "ssr-segmentor"  # metadata mark that tells our checkpoints from other safetensors files
INSTEAD = ("pass the model.safetensors that train.py wrote, or convert a released DAFormer/MIC .pth with python "
           "weights.py convert IN.pth OUT.safetensors")  # what every load error asks for


def write_segmentor(model: ssr.Segmentor, path: str, **meta) -> None:
    """Weights as safetensors, with the SegConfig and `meta` (JSON-serializable extras) in its metadata."""
    metadata = {"format": FORMAT, "cfg": json.dumps(asdict(model.cfg)), "meta": json.dumps(meta)}
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, path, metadata=metadata)


def save_segmentor(model: ssr.Segmentor, path: str, **meta) -> None:
    """write_segmentor, atomically (files.save_atomic): an interrupted save never leaves a broken file."""
    files.save_atomic(path, lambda tmp: write_segmentor(model, tmp, **meta))


def load_segmentor(path: str, device="cpu") -> tuple[ssr.Segmentor, dict]:
    """A checkpoint of save_segmentor -> (model in eval mode on `device`, dict(cfg=SegConfig, **meta)), strictly."""
    if not os.path.isfile(path):
        raise WeightsError(f"checkpoint {path} does not exist; {INSTEAD}.")
    try:
        with safe_open(path, "pt") as f:
            header = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path} is not a safetensors file ({e}); {INSTEAD}.") from None
    if header.get("format") != FORMAT or "cfg" not in header:
        raise WeightsError(f"{path} is a safetensors file but not a segmentor checkpoint of this project (no "
                           f"'{FORMAT}' metadata; ImageNet MiT weights go to train.py --pretrained): {INSTEAD}.")
    try:
        cfg = ssr.SegConfig(**json.loads(header["cfg"]))
    except (TypeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: unreadable segmentor metadata ({e}); re-save with save_segmentor.") from None
    # Built where it runs, random init and all: on the meta device the init's normal_ would import torch._dynamo
    # (1.4 s of eval.py's start-up on 2 cores, measured), more than the init of MiT-B5 itself costs.
    with torch.device(device):
        model = ssr.build_segmentor(cfg)
    files.check_keys(model, sd, path, f"segmentor its metadata describes ({cfg})",
                     "The file was edited or mixed up; re-save with save_segmentor.")
    model.load_state_dict(sd, strict=True)
    return model.eval(), {"cfg": cfg, **json.loads(header.get("meta", "{}"))}

# ----------------------------------------------------------------------------------------------------------------
# 2. train.py --resume: the model.safetensors beside a train_state.pt must be of the same run, and not behind it


def catch_up_model(model_path: str, state_path: str, state: dict, cfg: ssr.SegConfig, **meta) -> None:
    """A kill between the two renames of a save (files.save_checkpoint) leaves train.py's model.safetensors one save
    behind its train_state.pt (`state`): the model is written again from the state's student, of SegConfig cfg,
    with `meta`."""
    behind = not os.path.exists(model_path) or load_segmentor(model_path)[1].get("iters", 0) < state["iter"]
    if behind:
        with torch.device("meta"):  # every tensor comes from the state
            seg = ssr.build_segmentor(cfg)
        seg.load_state_dict({k.removeprefix("student."): v for k, v in state["uda"].items()
                             if k.startswith("student.")}, strict=True, assign=True)
        save_segmentor(seg, model_path, **meta)
        print(f"{model_path} was one save behind {state_path} (a stop between their two renames): written again "
              f"from the state, of iteration {state['iter']}")


def check_resumed_run(folder: str, state: dict, state_path: str, config_path: str, model_path: str,
                      cfg: ssr.SegConfig, **meta) -> None:
    """train.py --resume in `folder`: its train_state.pt (`state`), config.json and model.safetensors must come
    from one run, by the run id each records (files.check_one_run); a model one save behind the state is then
    written again (catch_up_model)."""
    files.check_one_run(folder, {state_path: lambda: state.get("run_id"),
                                 config_path: lambda: json.loads(pathlib.Path(config_path).read_text()).get("run_id"),
                                 model_path: lambda: load_segmentor(model_path)[1].get("run_id")})
    catch_up_model(model_path, state_path, state, cfg, **meta)
