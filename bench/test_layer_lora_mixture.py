"""MoSLD at a LLaMA-7B attention projection: the fused LoRA-mixture op against the PEFT-style loop
(every expert its own A and B, outputs weighted and summed), timed in interleaved rounds, with
the bytes each keeps for the backward."""

from __future__ import annotations

from scalearn_fast.bench.lora_mixture import run_mixture_case


def test_lora_mixture_layer(group_run, mixture_case, mode):
    run_mixture_case(group_run, mixture_case, mode)
