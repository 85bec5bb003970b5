"""One exit's vocabulary projection and label-smoothed cross-entropy, fused and chunked.

Aligned training (paper §2.2) projects every exit's states onto the vocabulary: N times the output
layer of a single-exit model. On CPU and small models those projections cost about as much as the
rest of the step, and autograd materializes several tokens x V tensors per exit (logits,
log-probabilities, the loss's gather/scatter gradients, the softmax gradient). This function
computes, ``chunk`` rows at a time, the loss, the NLL and — in the same pass — the gradients with
respect to the states and the classifier weight, so no tokens x V tensor outlives its chunk. The
matmuls are the same three autograd runs; the softmax, its gradient and the loss run on a
cache-sized block. Measured in ``benchmarks/training_speed.py``.

The loss is fairseq's ``label_smoothed_nll_loss`` exactly (summed over non-padding rows):
``(1 − ε − ε/(V−1))·nll + ε/(V−1)·Σ_v −log p_v``, i.e. ``(1 − ε')·nll + ε'·(lse − mean z)`` with
``ε' = ε·V/(V−1)`` and ``z`` the logits.
"""
import torch
from torch import Tensor


class LinearLabelSmoothedCE(torch.autograd.Function):
    """``loss, nll = LinearLabelSmoothedCE.apply(h, weight, target, eps, pad, chunk)`` with h (rows x C),
    weight (V x C, a bias-free classifier), target (rows,); sums over rows whose target is not pad."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, target: Tensor, eps: float, pad: int, chunk: int):
        vocab = weight.size(0)
        smooth = eps * vocab / (vocab - 1)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]  # False under no_grad (validation)
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros_like(weight) if need_grad else None
        loss, nll = h.new_zeros((), dtype=torch.float32), h.new_zeros((), dtype=torch.float32)
        for begin in range(0, h.size(0), chunk):
            hc, tc = h[begin:begin + chunk], target[begin:begin + chunk]
            z = (hc @ weight.t()).float()  # c x V
            keep = tc.ne(pad).to(z.dtype)
            lse = torch.logsumexp(z, dim=-1)
            row_nll = lse - z.gather(1, tc[:, None]).squeeze(1)
            row_smooth = lse - z.mean(dim=-1)
            loss += (((1 - smooth) * row_nll + smooth * row_smooth) * keep).sum()
            nll += (row_nll * keep).sum()
            if need_grad:  # dloss/dz = softmax(z) − (1 − ε')·onehot(target) − ε'/V, zero on padding
                g = z.sub_(lse[:, None]).exp_().sub_(smooth / vocab)
                g.scatter_add_(1, tc[:, None], g.new_full((tc.numel(), 1), -(1 - smooth)))
                g = g.mul_(keep[:, None]).to(h.dtype)
                torch.mm(g, weight, out=grad_h[begin:begin + chunk])
                grad_w.addmm_(g.t(), hc)
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(nll)
        return loss.to(h.dtype), nll.to(h.dtype)

    @staticmethod
    def backward(ctx, grad_loss, grad_nll):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None, None, None


def fused_exit_loss(features: Tensor, classifier: torch.nn.Module, target: Tensor, eps: float, pad: int,
                    chunk: int = 256):
    """(loss, nll) of one exit: ``features`` (..., C) through ``classifier`` (a bias-free Linear) against
    ``target`` (...), label-smoothed with ``eps``, summed over non-padding positions."""
    return LinearLabelSmoothedCE.apply(features.reshape(-1, features.size(-1)), classifier.weight,
                                       target.reshape(-1), eps, pad, chunk)
