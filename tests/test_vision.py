"""The vision tower (keys, per-head attention layout, resampler, positions) and image loading/preprocessing."""

from __future__ import annotations

import hashlib
import http.server
import io
import math
import socket
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from qwenvl_cli.errors import QwenvlError
from qwenvl_cli.images import load_image
from qwenvl_cli.model.image import IMAGE_MEAN, IMAGE_STD, preprocess_image, preprocess_images
from qwenvl_cli.model.vision import VisionTransformer, resize_pos_table, sincos_table

TINY = dict(image_size=28, patch_size=14, width=64, layers=2, heads=4, mlp_ratio=2.0, output_dim=128)
TINY_2HEADS = {**TINY, "output_dim": 256}


def make_model(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> VisionTransformer:
    model = VisionTransformer(**{**TINY, **overrides})
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # non-trivial LayerNorms and biases, so the references check them too
        gen = torch.Generator().manual_seed(seed + 100)
        for name, param in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return model.to(dtype).eval()


def layer_norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6) * ln.weight + ln.bias


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = (q / math.sqrt(q.shape[-1])) @ k.transpose(-1, -2)
    return torch.softmax(scores, dim=-1) @ v


# --- state dict -------------------------------------------------------------------------------------

EXPECTED_TINY_SHAPES = {
    "conv1.weight": (64, 3, 14, 14),
    "positional_embedding": (256, 64),
    "ln_pre.weight": (64,),
    "ln_pre.bias": (64,),
    **{
        f"transformer.resblocks.{n}.{name}": shape
        for n in range(2)
        for name, shape in {
            "ln_1.weight": (64,),
            "ln_1.bias": (64,),
            "attn.in_proj.weight": (192, 64),
            "attn.in_proj.bias": (192,),
            "attn.out_proj.weight": (64, 64),
            "attn.out_proj.bias": (64,),
            "ln_2.weight": (64,),
            "ln_2.bias": (64,),
            "mlp.c_fc.weight": (128, 64),
            "mlp.c_fc.bias": (128,),
            "mlp.c_proj.weight": (64, 128),
            "mlp.c_proj.bias": (64,),
        }.items()
    },
    "attn_pool.query": (256, 128),
    "attn_pool.pos_embed": (256, 128),
    "attn_pool.kv_proj.weight": (128, 64),
    "attn_pool.attn.in_proj_weight": (384, 128),
    "attn_pool.attn.in_proj_bias": (384,),
    "attn_pool.attn.out_proj.weight": (128, 128),
    "attn_pool.attn.out_proj.bias": (128,),
    "attn_pool.ln_q.weight": (128,),
    "attn_pool.ln_q.bias": (128,),
    "attn_pool.ln_kv.weight": (128,),
    "attn_pool.ln_kv.bias": (128,),
    "ln_post.weight": (128,),
    "ln_post.bias": (128,),
    "proj": (128, 128),
}


def test_state_dict_keys_and_shapes():
    model = VisionTransformer(**TINY, image_start_id=999)  # unused config keys are accepted
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert shapes == EXPECTED_TINY_SHAPES
    assert model.vision_tokens == 256
    assert not model.attn_pool.pos_embed.requires_grad
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(EXPECTED_TINY_SHAPES) - {"attn_pool.pos_embed"}


def test_no_kv_proj_when_width_equals_output_dim():
    model = VisionTransformer(**{**TINY, "width": 128})
    assert isinstance(model.attn_pool.kv_proj, torch.nn.Identity)
    assert not any("kv_proj" in key for key in model.state_dict())


def test_resampler_heads_follow_output_dim():
    assert VisionTransformer(**TINY).attn_pool.attn.num_heads == 1
    assert VisionTransformer(**TINY_2HEADS).attn_pool.attn.num_heads == 2
    with pytest.raises(ValueError, match="multiple of 128"):
        VisionTransformer(**{**TINY, "output_dim": 192})


# --- ViT block attention: per-head interleaved in_proj ------------------------------------------------


def block_attention_reference(attn, x: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    heads, hd = attn.heads, attn.head_dim
    width = heads * hd
    w, b = attn.in_proj.weight, attn.in_proj.bias
    outs = []
    for h in range(heads):
        if interleaved:
            rows = [slice(h * 3 * hd + i * hd, h * 3 * hd + (i + 1) * hd) for i in range(3)]
        else:  # the [Wq; Wk; Wv] reading, which is NOT Qwen-VL's layout
            rows = [slice(i * width + h * hd, i * width + (h + 1) * hd) for i in range(3)]
        q, k, v = (x @ w[r].T + b[r] for r in rows)
        outs.append(softmax_attention(q, k, v))
    return torch.cat(outs, dim=-1) @ attn.out_proj.weight.T + attn.out_proj.bias


def test_block_attention_is_interleaved_per_head():
    model = make_model()
    attn = model.transformer.resblocks[0].attn
    with torch.no_grad():
        attn.in_proj.weight.copy_(torch.randn(attn.in_proj.weight.shape, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(2, 5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = attn(x)
        torch.testing.assert_close(got, block_attention_reference(attn, x), atol=1e-6, rtol=0)
        wrong = block_attention_reference(attn, x, interleaved=False)
    assert (got - wrong).abs().max() > 1e-2


def test_block_is_pre_ln_with_exact_gelu():
    model = make_model()
    block = model.transformer.resblocks[1]
    x = torch.randn(1, 4, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h = x + block_attention_reference(block.attn, layer_norm(x, block.ln_1))
        u = layer_norm(h, block.ln_2) @ block.mlp.c_fc.weight.T + block.mlp.c_fc.bias
        gelu = 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))
        expected = h + gelu @ block.mlp.c_proj.weight.T + block.mlp.c_proj.bias
        torch.testing.assert_close(block(x), expected, atol=1e-10, rtol=0)


# --- resampler -------------------------------------------------------------------------------------


def resampler_reference(pool, x: torch.Tensor) -> torch.Tensor:
    dim = pool.embed_dim
    heads = dim // 128
    kv = x @ pool.kv_proj.weight.T if isinstance(pool.kv_proj, torch.nn.Linear) else x
    kv = layer_norm(kv, pool.ln_kv)
    src, tgt = math.isqrt(pool.pos_embed.shape[0]), math.isqrt(x.shape[1])
    key_pos = pool.pos_embed
    if src != tgt:
        square = pool.pos_embed.float().reshape(1, src, src, dim).permute(0, 3, 1, 2)
        key_pos = F.interpolate(square, size=(tgt, tgt), mode="bicubic", align_corners=False)
        key_pos = key_pos.permute(0, 2, 3, 1).reshape(tgt * tgt, dim).to(pool.pos_embed.dtype)
    query = layer_norm(pool.query, pool.ln_q) + pool.pos_embed
    wq, wk, wv = pool.attn.in_proj_weight.chunk(3)
    bq, bk, bv = pool.attn.in_proj_bias.chunk(3)
    q = query @ wq.T + bq  # (Q, D), same for every image
    k = (kv + key_pos) @ wk.T + bk  # (n, L, D)
    v = kv @ wv.T + bv
    hd = dim // heads
    cols = [slice(h * hd, (h + 1) * hd) for h in range(heads)]  # standard layout: head h is a contiguous block
    outs = [softmax_attention(q[:, c], k[..., c], v[..., c]) for c in cols]
    return torch.cat(outs, dim=-1) @ pool.attn.out_proj.weight.T + pool.attn.out_proj.bias


@pytest.mark.parametrize("config", [TINY, TINY_2HEADS, {**TINY, "width": 128}], ids=["1head", "2heads", "no-kv-proj"])
@pytest.mark.parametrize("length", [4, 9, 256])
def test_resampler_matches_reference(config, length):
    model = make_model(**config)
    x = torch.randn(2, length, config["width"], dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = model.attn_pool(x)
        assert got.shape == (2, 256, config["output_dim"])
        torch.testing.assert_close(got, resampler_reference(model.attn_pool, x), atol=1e-6, rtol=0)


def test_resampler_uses_pos_embed_for_query_and_key():
    model = make_model()
    x = torch.randn(1, 4, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model.attn_pool(x)
        model.attn_pool.pos_embed.zero_()
        assert (model.attn_pool(x) - before).abs().max() > 1e-3


# --- positions ---------------------------------------------------------------------------------------


def test_resize_pos_table_identity_on_same_grid():
    table = torch.randn(256, 8)
    assert resize_pos_table(table, 16) is table


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("grid", [2, 7, 32])
def test_resize_pos_table_bicubic_in_fp32(dtype, grid):
    table = torch.randn(256, 8, generator=torch.Generator().manual_seed(6)).to(dtype)
    got = resize_pos_table(table, grid)
    square = table.float().reshape(1, 16, 16, 8).permute(0, 3, 1, 2)
    expected = F.interpolate(square, size=(grid, grid), mode="bicubic", align_corners=False)
    expected = expected.permute(0, 2, 3, 1).reshape(grid * grid, 8).to(dtype)
    assert got.dtype == dtype
    assert torch.equal(got, expected)


def test_resize_pos_table_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        resize_pos_table(torch.zeros(10, 4), 3)


def manual_forward(model: VisionTransformer, pixels: torch.Tensor, patch_pos: torch.Tensor) -> torch.Tensor:
    """The tower spelled out, with patches cut by hand (row-major) instead of a convolution."""
    p = model.patch_size
    n, _, size, _ = pixels.shape
    g = size // p
    patches = pixels.reshape(n, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, 3 * p * p)
    x = patches @ model.conv1.weight.reshape(model.width, -1).T + patch_pos
    x = layer_norm(x, model.ln_pre)
    for block in model.transformer.resblocks:
        x = block(x)
    return layer_norm(model.attn_pool(x), model.ln_post) @ model.proj


def test_forward_uses_stored_positions_on_16x16_grid():
    model = make_model(image_size=224)
    pixels = torch.randn(1, 3, 224, 224, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = model(pixels)
        expected = manual_forward(model, pixels, model.positional_embedding)
    assert got.shape == (1, 256, 128)
    torch.testing.assert_close(got, expected, atol=1e-8, rtol=0)


def test_forward_interpolates_positions_off_grid():
    model = make_model()
    pixels = torch.randn(2, 3, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    square = model.positional_embedding.float().reshape(1, 16, 16, 64).permute(0, 3, 1, 2)
    pos = F.interpolate(square, size=(2, 2), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(4, 64)
    with torch.no_grad():
        got = model(pixels)
        expected = manual_forward(model, pixels, pos.double())
        unresized = manual_forward(model, pixels, model.positional_embedding[:4])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert (got - unresized).abs().max() > 1e-4


def test_sincos_table_values():
    dim, g = 16, 4
    table = sincos_table(dim, g)
    assert table.shape == (g * g, dim) and table.dtype == torch.float32
    q = dim // 4
    assert table[0].tolist() == [0.0] * q + [1.0] * q + [0.0] * q + [1.0] * q
    r, h, w = 2 * g + 3, 2, 3  # row-major: row r is (h, w)
    omega = [1 / 10000 ** (i / q) for i in range(q)]
    expected = (
        [math.sin(w * o) for o in omega]
        + [math.cos(w * o) for o in omega]
        + [math.sin(h * o) for o in omega]
        + [math.cos(h * o) for o in omega]
    )
    torch.testing.assert_close(table[r], torch.tensor(expected, dtype=torch.float32), atol=1e-7, rtol=0)


def test_sincos_table_matches_meshgrid_recipe():
    dim, g = 128, 16
    grid = np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32))  # grid[0] = column
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def half(pos):
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    expected = np.concatenate([half(grid[0]), half(grid[1])], axis=1).astype(np.float32)
    torch.testing.assert_close(sincos_table(dim, g), torch.from_numpy(expected), atol=1e-6, rtol=0)


# --- whole tower ---------------------------------------------------------------------------------------


def test_output_shape_dtype_and_batch_independence():
    model = make_model(dtype=torch.float32, **TINY_2HEADS)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        both = model(pixels.double())  # cast to the weights' dtype
        first, second = model(pixels[:1]), model(pixels[1:])
    assert both.shape == (2, 256, 256) and both.dtype == torch.float32
    assert model.dtype == torch.float32
    torch.testing.assert_close(both, torch.cat([first, second]), atol=1e-5, rtol=1e-5)


def test_bf16_forward_runs():
    model = make_model(dtype=torch.bfloat16)
    out = model(torch.randn(1, 3, 28, 28))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_gradient_checkpointing_same_gradients():
    pixels = torch.randn(2, 3, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    grads = []
    for checkpointing in (False, True):
        model = make_model().train()
        model.gradient_checkpointing = checkpointing
        (model(pixels) ** 2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-12, rtol=0, msg=name)
    assert grads[0]["transformer.resblocks.0.attn.in_proj.weight"].abs().sum() > 0


def test_init_weights_deterministic():
    def init(seed, dtype=torch.float32):
        model = VisionTransformer(**TINY).to(dtype)
        model.init_weights(generator=torch.Generator().manual_seed(seed))
        return model.state_dict()

    a, b, c = init(0), init(0), init(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])
    assert torch.equal(a["attn_pool.pos_embed"], sincos_table(128, 16))
    assert torch.equal(a["ln_pre.weight"], torch.ones(64)) and torch.equal(a["ln_pre.bias"], torch.zeros(64))
    assert torch.equal(a["attn_pool.attn.in_proj_bias"], torch.zeros(384))
    assert 0.015 < a["transformer.resblocks.0.mlp.c_fc.weight"].std() < 0.025
    assert 0.8 < a["positional_embedding"].std() * 64**0.5 < 1.2
    assert 0.8 < a["proj"].std() * 128**0.5 < 1.2
    half = init(0, torch.bfloat16)
    assert all(torch.equal(half[k], a[k].to(torch.bfloat16)) for k in a)


def test_init_weights_keeps_parameters_loaded_by_transformers():
    model = VisionTransformer(**TINY)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    loaded = model.conv1.weight.detach().clone()
    other = model.proj.detach().clone()
    model.conv1.weight._is_hf_initialized = True  # what transformers sets on loaded tensors
    model.init_weights(generator=torch.Generator().manual_seed(1))
    assert torch.equal(model.conv1.weight, loaded)
    assert not torch.equal(model.proj, other)


# --- image preprocessing ---------------------------------------------------------------------------------


def normalised(rgb: tuple[float, float, float]) -> torch.Tensor:
    return torch.tensor([(v - m) / s for v, m, s in zip(rgb, IMAGE_MEAN, IMAGE_STD, strict=True)])


def test_preprocess_solid_red_exact():
    out = preprocess_image(Image.new("RGB", (50, 30), (255, 0, 0)), 28)
    assert out.shape == (3, 28, 28) and out.dtype == torch.float32
    expected = normalised((1.0, 0.0, 0.0)).view(3, 1, 1).expand(3, 28, 28)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_preprocess_matches_pil_bicubic_without_keeping_aspect():
    image = Image.new("RGB", (80, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 40, 20))  # left half red, right half blue
    out = preprocess_image(image, 16)
    ref = np.asarray(image.resize((16, 16), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    expected = (torch.from_numpy(ref).permute(2, 0, 1) - torch.tensor(IMAGE_MEAN).view(3, 1, 1)) / torch.tensor(
        IMAGE_STD
    ).view(3, 1, 1)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 8, 0], normalised((1.0, 0.0, 0.0)), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 8, 15], normalised((0.0, 0.0, 1.0)), atol=1e-6, rtol=0)


def test_preprocess_converts_gray_and_rgba():
    gray = preprocess_image(Image.new("L", (10, 10), 128), 14)
    torch.testing.assert_close(gray[:, 0, 0], normalised((128 / 255,) * 3), atol=1e-6, rtol=0)
    rgba = preprocess_image(Image.new("RGBA", (10, 10), (0, 255, 0, 0)), 14)
    torch.testing.assert_close(rgba[:, 5, 5], normalised((0.0, 1.0, 0.0)), atol=1e-6, rtol=0)


def test_preprocess_images_stacks():
    images = [Image.new("RGB", (5, 9), (255, 0, 0)), Image.new("RGB", (9, 5), (0, 0, 0))]
    out = preprocess_images(images, 14)
    assert out.shape == (2, 3, 14, 14) and out.dtype == torch.float32
    assert torch.equal(out[1], preprocess_image(images[1], 14))
    assert preprocess_images([], 14).shape == (0, 3, 14, 14)


# --- image loading -------------------------------------------------------------------------------------


def png_bytes(color=(10, 20, 30), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (6, 4), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_load_local_relative_and_absolute(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png_bytes((1, 2, 3, 4), mode="RGBA"))
    image = load_image("imgs/a.png", root=tmp_path)
    assert image.mode == "RGB" and image.size == (6, 4) and image.getpixel((0, 0)) == (1, 2, 3)
    assert load_image(str(tmp_path / "imgs" / "a.png")).size == (6, 4)


def test_load_missing_file(tmp_path):
    with pytest.raises(QwenvlError) as info:
        load_image("nope.png", root=tmp_path)
    assert str(tmp_path / "nope.png") in info.value.message and info.value.fix
    assert "\n" not in str(info.value)


def test_load_directory(tmp_path):
    with pytest.raises(QwenvlError, match="not a file"):
        load_image(str(tmp_path))


@pytest.mark.parametrize("data", [b"definitely not a png", png_bytes()[:40]], ids=["garbage", "truncated"])
def test_load_undecodable(tmp_path, data):
    path = tmp_path / "bad.png"
    path.write_bytes(data)
    with pytest.raises(QwenvlError) as info:
        load_image(str(path))
    assert str(path) in info.value.message and "decode" in info.value.message and info.value.fix
    assert "\n" not in str(info.value)


@pytest.fixture
def image_server(monkeypatch):
    """A local HTTP server on 127.0.0.1: /ok.png, /garbage.png, anything else 404; counts requests."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    bodies = {"/ok.png": png_bytes((200, 100, 50)), "/garbage.png": b"<html>not an image</html>"}
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            body = bodies.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()
    thread.join()


def test_load_url_cached(image_server, tmp_path):
    base, hits = image_server
    url = f"{base}/ok.png"
    cache = tmp_path / "cache"
    first = load_image(url, cache_dir=cache)
    second = load_image(url, cache_dir=cache)
    assert first.getpixel((0, 0)) == second.getpixel((0, 0)) == (200, 100, 50)
    assert hits == ["/ok.png"]
    assert [p.name for p in cache.iterdir()] == [hashlib.sha256(url.encode()).hexdigest()]
    load_image(url)  # no cache_dir: always downloads
    assert len(hits) == 2


def test_load_url_errors(image_server, tmp_path):
    base, _ = image_server
    with pytest.raises(QwenvlError) as info:
        load_image(f"{base}/missing.png", cache_dir=tmp_path, timeout=5)
    assert f"{base}/missing.png" in info.value.message and "404" in info.value.message
    with pytest.raises(QwenvlError, match="could not be decoded") as info:
        load_image(f"{base}/garbage.png", cache_dir=tmp_path, timeout=5)
    assert f"{base}/garbage.png" in info.value.message
    assert list(tmp_path.iterdir()) == []  # nothing that failed was cached


def test_load_url_unreachable(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(QwenvlError, match="could not be downloaded"):
        load_image(f"http://127.0.0.1:{port}/x.png", timeout=2)
