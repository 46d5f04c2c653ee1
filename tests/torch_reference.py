"""A PyTorch DiT + DTR of the official layout, written from SPEC §2-3 for tests and benchmarks.

Module and parameter names are those of the DiT release (timm-style attention, adaLN-Zero
blocks, `pos_embed` as a frozen parameter); a routed model carries the DTR release's
per-block buffer `blocks.N.routing._unit_mapping` (T, C), gathered by the per-sample t.
`tables` passed to `forward` override the buffers (one model, several routings).
"""

import math

import numpy as np
import torch
import torch.nn as tnn


def mae_pos_embed(dim, grid_size):
    """2-D sin-cos position embedding as in MAE's get_2d_sincos_pos_embed (numpy)."""
    grid = np.meshgrid(
        np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)
    )  # w goes first (MAE)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def t_modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def t_layer_norm(dim):
    return tnn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def holder(**children):
    """A bare nn.Module holding named children, to reproduce the release's names."""
    m = tnn.Module()
    for name, child in children.items():
        setattr(m, name, child)
    return m


class TAttention(tnn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = tnn.Linear(dim, 3 * dim, bias=True)
        self.proj = tnn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class TBlock(tnn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = t_layer_norm(dim), t_layer_norm(dim)
        self.attn = TAttention(dim, heads)
        self.mlp = holder(
            fc1=tnn.Linear(dim, 4 * dim),
            act=tnn.GELU(approximate="tanh"),
            fc2=tnn.Linear(4 * dim, dim),
        )
        self.adaLN_modulation = tnn.Sequential(tnn.SiLU(), tnn.Linear(dim, 6 * dim))

    def forward(self, x, c, m=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(
            c
        ).chunk(6, dim=1)
        mlp = lambda z: self.mlp.fc2(self.mlp.act(self.mlp.fc1(z)))  # noqa: E731
        h = x if m is None else x * m
        h = h + gate_msa.unsqueeze(1) * self.attn(t_modulate(self.norm1(h), shift_msa, scale_msa))
        h = h + gate_mlp.unsqueeze(1) * mlp(t_modulate(self.norm2(h), shift_mlp, scale_mlp))
        return h if m is None else h + x * (1 - m)


class TRouting(tnn.Module):
    """The DTR release's task router state: its (T, C) 0/1 table as a float buffer."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer(
            "_unit_mapping", torch.as_tensor(np.asarray(table), dtype=torch.float32)
        )


class TDiT(tnn.Module):
    """NCHW DiT; with `tables` (G, T, C), G = 1 or depth, every block gets a routing buffer."""

    def __init__(
        self,
        input_size,
        in_channels,
        patch_size,
        hidden_size,
        depth,
        num_heads,
        num_classes,
        tables=None,
    ):
        super().__init__()
        d, p = hidden_size, patch_size
        self.p, self.out_channels = p, 2 * in_channels
        self.x_embedder = holder(proj=tnn.Conv2d(in_channels, d, p, stride=p))
        self.t_embedder = holder(
            mlp=tnn.Sequential(tnn.Linear(256, d), tnn.SiLU(), tnn.Linear(d, d))
        )
        self.y_embedder = holder(embedding_table=tnn.Embedding(num_classes + 1, d))
        pos = torch.from_numpy(mae_pos_embed(d, input_size // p)).float()[None]
        self.pos_embed = tnn.Parameter(pos, requires_grad=False)  # as in the release
        self.blocks = tnn.ModuleList([TBlock(d, num_heads) for _ in range(depth)])
        if tables is not None:
            for i, block in enumerate(self.blocks):
                block.routing = TRouting(tables[i % len(tables)])
        self.final_layer = holder(
            norm_final=t_layer_norm(d),
            linear=tnn.Linear(d, p * p * self.out_channels),
            adaLN_modulation=tnn.Sequential(tnn.SiLU(), tnn.Linear(d, 2 * d)),
        )

    @staticmethod
    def timestep_embedding(t, dim=256, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, x, t, y, tables=None):
        x = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder.mlp(self.timestep_embedding(t)) + self.y_embedder.embedding_table(y)
        for i, block in enumerate(self.blocks):
            if tables is not None:
                table = tables[i % len(tables)]
            else:
                table = getattr(getattr(block, "routing", None), "_unit_mapping", None)
            m = None if table is None else table[t].unsqueeze(1).float()
            x = block(x, c, m)
        fl = self.final_layer
        shift, scale = fl.adaLN_modulation(c).chunk(2, dim=1)
        x = fl.linear(t_modulate(fl.norm_final(x), shift, scale))
        g, p, oc = int(x.shape[1] ** 0.5), self.p, self.out_channels
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], g, g, p, p, oc))
        return x.reshape(x.shape[0], oc, g * p, g * p)


class TSiT(TDiT):
    """SiT's model (willisma/SiT models.py): the DiT layout and weights, its time t in
    [0, 1] (1: data) fed to the timestep embedder as it is, and the second (learned-sigma)
    half of the output dropped. `guided` is its `forward_with_cfg` with guidance on all
    channels (SiT's commented-out "standard approach"; its default guides 3 of 4)."""

    def forward(self, x, t, y, tables=None):
        return super().forward(x, t, y, tables)[:, : self.out_channels // 2]

    def guided(self, x, t, y, cfg_scale, null):
        both = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = both.chunk(2)
        return uncond + cfg_scale * (cond - uncond)
