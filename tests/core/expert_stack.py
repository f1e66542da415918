"""A tiny pi0.5-expert-shaped module tree (real attention + gated MLP) for core tests."""

import torch
import torch.nn.functional as F
from torch import nn


class Attn(nn.Module):
    def __init__(self, width, heads, head_dim):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.q_proj = nn.Linear(width, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(width, head_dim, bias=False)
        self.v_proj = nn.Linear(width, head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, width, bias=False)

    def forward(self, h):
        b, t, _ = h.shape
        q = self.q_proj(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).unsqueeze(1)
        v = self.v_proj(h).unsqueeze(1)
        out = F.scaled_dot_product_attention(q, k.expand_as(q), v.expand_as(q))
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class Mlp(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, h):
        return self.down_proj(F.gelu(self.gate_proj(h), approximate="tanh") * self.up_proj(h))


class Norm(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.dense = nn.Linear(width, 3 * width)  # adaptive-norm conditioning, as in the pi0.5 expert


class Layer(nn.Module):
    def __init__(self, width, hidden, heads, head_dim):
        super().__init__()
        self.input_layernorm = Norm(width)
        self.self_attn = Attn(width, heads, head_dim)
        self.mlp = Mlp(width, hidden)

    def forward(self, h):
        h = h + self.self_attn(F.rms_norm(h, h.shape[-1:]))
        return h + self.mlp(F.rms_norm(h, h.shape[-1:]))


class Stack(nn.Module):
    def __init__(self, width, depth, hidden, heads, head_dim):
        super().__init__()
        self.layers = nn.ModuleList([Layer(width, hidden, heads, head_dim) for _ in range(depth)])


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = None


class WithExpert(nn.Module):
    def __init__(self, width, depth, hidden, heads, head_dim):
        super().__init__()
        self.gemma_expert = Expert()
        self.gemma_expert.model = Stack(width, depth, hidden, heads, head_dim)


class ExpertShapedPolicy(nn.Module):
    """Names like openpi's pi0.5: paligemma_with_expert.gemma_expert.model.layers.N.*, action heads at top."""

    def __init__(self, width=32, depth=2, hidden=64, heads=4, head_dim=8, action_dim=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.action_in_proj = nn.Linear(action_dim, width)
        self.paligemma_with_expert = WithExpert(width, depth, hidden, heads, head_dim)
        self.action_out_proj = nn.Linear(width, action_dim)

    def forward(self, actions):
        h = self.action_in_proj(actions)
        for layer in self.paligemma_with_expert.gemma_expert.model.layers:
            h = layer(h)
        return self.action_out_proj(h)
