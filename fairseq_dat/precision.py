"""``--autocast-bf16``: mixed precision that also runs on a CPU.

fairseq 0.12's reduced-precision flags do not: ``--bf16`` implies ``--tpu`` (torch_xla) and casts the
whole model, ``--fp16`` / ``--amp`` need CUDA. Under ``torch.autocast(bfloat16)`` the matrix products run
in bfloat16 on the float32 weights (AMX / AVX512-BF16 on recent x86 CPUs, tensor cores on GPUs), while
weights, gradients, optimizer state, softmax/log-softmax and the beam search's scores stay float32, and
bfloat16's float32 exponent range needs no loss scaling. Used by the task's training and validation
steps (through fairseq's own ``train_step``/``valid_step``) and by the exit-aware generator.
"""
import contextlib

import torch


def bf16_autocast(model: torch.nn.Module, enabled: bool = True):
    """Context: ``torch.autocast(bfloat16)`` on ``model``'s device (nothing when not ``enabled``). On a CPU
    also the math attention kernel: the fused CPU kernel's bfloat16 backward took 690 ms against its
    float32 98 ms for the same steps of the 6+6 x 256 model (torch 2.13; the math kernel is two bfloat16
    matrix products)."""
    if not enabled:
        return contextlib.nullcontext()
    device = next(model.parameters()).device.type
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device, dtype=torch.bfloat16))
    if device == "cpu":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


def under_bf16_autocast(criterion):
    """``criterion`` (called as fairseq calls it: ``criterion(model, sample)``) with its forward pass under
    :func:`bf16_autocast`; whoever calls it runs the backward pass afterwards, outside the context, as
    torch.autocast prescribes (fairseq's ``FairseqTask.train_step``)."""
    def forward(model, sample):
        with bf16_autocast(model):
            return criterion(model, sample)
    return forward
