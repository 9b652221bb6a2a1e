# ruff: noqa: E402  (TRITON_INTERPRET must be cleared and the repo put on sys.path before imports)
"""Compile the repo's Triton kernels for sm_90a offline (no GPU) with the launch-time
specialization a contiguous RoBERTa-base call would get; report smem / regs / spills."""

import os
import re
import subprocess
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")
os.environ.pop("TRITON_INTERPRET", None)
os.environ["SCALEARN_FAST_AUTOTUNE"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.environ.get("REPO", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")))
import triton
import triton.backends.nvidia as nv
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import kernels.scaled_adapter_sum as F
import kernels.scaled_adapter_sum_backward as B

PTXAS = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas-blackwell")
TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 232448  # H100 max dynamic smem per block

T, D, R, N = 4096, 768, int(os.environ.get("R", 384)), 8
# stride values of contiguous tensors; '1' strides get specialised to constexpr like at launch
STRIDES = {
    "z_t": D,
    "z_d": 1,
    "wd_r": D,
    "wd_d": 1,
    "w_d": R,
    "w_r": 1,
    "omega_n": D,
    "omega_d": 1,
    "rs_t": N,
    "rs_n": 1,
    "pre_t": R,
    "pre_r": 1,
    "s_t": R,
    "s_r": 1,
    "b_t": D,
    "bias_t": D,
    "bias_d": 1,
    "res_t": D,
    "res_d": 1,
    "out_t": D,
    "out_d": 1,
    "g_t": D,
    "g_d": 1,
    "dpre_t": R,
    "dpre_r": 1,
    "gs_t": R,
    "gs_r": 1,
    "a_t": R,
    "a_r": 1,
    "part_s": R * D,
    "part_r": D,
    "part_d": 1,
    "b_up_n": D,
    "b_up_d": 1,
    "gt_t": R,
    "gt_c": 1,
    "a_c": 1,
    "b_d": 1,
    "o_s": R * D,
    "o_c": D,
}
SCALARS = {"T": T, "d": D, "R": R, "chunk": 1024, "N_EXT": N, "C": R}


def build(fn, dtype, consts, ptr_types):
    sig, cst, attrs = {}, dict(consts), {}
    for i, p in enumerate(fn.params):
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            sig[name] = ptr_types.get(name, "*" + dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
            continue
        v = STRIDES[name[len("stride_") :]] if name.startswith("stride_") else SCALARS[name]
        if v == 1:
            sig[name] = "constexpr"
            cst[name] = 1
        else:
            sig[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    cst = {(fn.arg_names.index(k),): v for k, v in cst.items()}
    return sig, cst, attrs


def compile_all(autotuner, dtype, consts, ptr_types=None, label="", prune=None):
    fn = autotuner.fn
    configs = autotuner.configs if prune is None else prune(autotuner.configs, {}, **consts)
    for cfg in configs:
        sig, cst, attrs = build(fn, dtype, {**consts, **cfg.kwargs}, ptr_types or {})
        tag = f"{label} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}"
        try:
            k = triton.compile(
                ASTSource(fn, sig, cst, attrs),
                target=TARGET,
                options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
            )
        except Exception as e:  # noqa: BLE001
            print(f"{tag}: COMPILE FAIL {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            continue
        smem = k.metadata.shared
        ttgir = k.asm["ttgir"]
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(k.asm["ptx"])
        out = subprocess.run(
            [PTXAS, "-v", "--gpu-name=sm_90a", f.name, "-o", "/dev/null"], capture_output=True, text=True
        ).stderr
        regs = re.search(r"Used (\d+) registers", out)
        spill = re.search(r"(\d+) bytes spill stores", out)
        flags = []
        if smem > SMEM_LIMIT:
            flags.append("OUT OF SMEM")
        if spill and int(spill.group(1)):
            flags.append("SPILLS")
        print(
            f"{tag}: smem {smem / 1024:.0f}KB regs {regs and regs.group(1)} "
            f"spill {spill and spill.group(1)}B "
            f"wgmma={'warp_group_dot' in ttgir} async={'async_copy' in ttgir} {' '.join(flags)}",
            flush=True,
        )


which = sys.argv[1]
dtype = sys.argv[2] if len(sys.argv) > 2 else "fp16"
i64 = {"src_ptr": "*i64"}
if which in ("fused", "fused_infer"):  # training (P saved, ω folded on the fly) / inference (ω pre-folded)
    r_pad = max(16, triton.next_power_of_2(R))
    train = which == "fused"
    consts = dict(
        ACT=0,
        HAS_RS=False,
        HAS_PRE=train,
        HAS_OMEGA=train,
        HAS_BIAS=True,
        BIAS_ROWS=False,
        HAS_RES=True,
        R_PAD=r_pad,
    )
    prune = getattr(F, "_prune_fused", None)
    compile_all(
        F._fused_kernel, dtype, consts, {**i64, "bias_ptr": "*fp32"}, f"{which} {dtype} R_PAD={r_pad}", prune
    )
elif which == "down":
    compile_all(
        F._down_projection_kernel,
        dtype,
        dict(ACT=0, HAS_RS=True, HAS_PRE=True),
        i64,
        f"down {dtype}",
    )
elif which == "up":
    compile_all(
        F._up_projection_kernel,
        dtype,
        dict(HAS_OMEGA=True, HAS_BIAS=True, BIAS_ROWS=False, HAS_RES=True),
        {**i64, "bias_ptr": "*fp32"},
        f"up {dtype}",
    )
elif which == "grad_pre":
    compile_all(
        B._grad_pre_kernel,
        dtype,
        dict(ACT=0, HAS_RS=True, HAS_OMEGA=True, HAS_GS=True, HAS_B_UP=True),
        {**i64, "gs_ptr": "*fp32"},
        f"grad_pre {dtype}",
    )
elif which == "tn":
    compile_all(
        B._tn_gemm_kernel,
        dtype,
        dict(ACT=0, A_IS_PRE=True, HAS_RS=True, HAS_SRC=True),
        {**i64, "part_ptr": "*fp32"},
        f"tn {dtype}",
    )
