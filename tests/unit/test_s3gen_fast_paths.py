"""The S3Gen engine's fast paths on CPU against what they replace: FastEstimator == upstream's estimator
forward (tiny and full architecture, padded and fully masked rows, fp32 and bf16), and HiFT rows padded to a
length bucket == unpadded."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from s3gen_helpers import one_thread, fresh_s3gen, random_tokens, random_voice  # noqa: F401  (one_thread: autouse fixture)
from serve_app.engine.s3gen import S3GenEngine, S3GenEngineConfig, VocodeInput
from serve_app.engine.s3gen.estimator import FastEstimator, supports
from serve_app.engine.s3gen.flow import use_sync_free_masks
from serve_app.engine.s3gen.vocoder import HiftRow, HiftRunner


def _estimator_inputs(B, T, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, mu, cond = (torch.randn(B, 80, T, generator=g).to(dtype) for _ in range(3))
    mask = torch.ones(B, 1, T, dtype=dtype)
    mask[1, :, T // 2:] = 0     # a padded row
    mask[2] = 0                 # a fully masked row (a graph's pad row may be one)
    return x, mask, mu, torch.rand(B, generator=g).to(dtype), torch.randn(B, 80, generator=g).to(dtype), cond


@pytest.mark.parametrize("preset,dtype", [("tiny", torch.float32), ("tiny", torch.bfloat16),
                                          pytest.param("full", torch.float32, marks=pytest.mark.slow)])
def test_fast_estimator_equals_upstream(preset, dtype):
    use_sync_free_masks()
    est = fresh_s3gen(preset).flow.decoder.estimator.to(dtype)
    assert supports(est)
    fast = FastEstimator(est)
    assert all(w is not None for w in fast.qkv)                           # q, k, v fused in every block
    inputs = _estimator_inputs(3, 40, dtype)
    with torch.inference_mode():
        ref, out = est(*inputs), fast(*inputs)
    assert out.dtype == dtype and out.shape == ref.shape == (3, 80, 40)
    tol = 1e-5 if dtype == torch.float32 else 0.05 * float(ref.float().std())
    assert float((out.float() - ref.float()).abs().max()) <= tol
    assert float(out[1, :, 20:].abs().max()) == 0.0                       # masked frames stay zero


def test_fast_estimator_refuses_other_estimators():
    est = fresh_s3gen("tiny").flow.decoder.estimator
    est.meanflow = True
    assert not supports(est)
    with pytest.raises(ValueError, match="not the standard"):
        FastEstimator(est)


def test_engine_uses_fast_estimator_and_matches_upstream_forward():
    voice, tokens = random_voice(6, 3), random_tokens(14, 3)
    fast = S3GenEngine(fresh_s3gen("tiny"), S3GenEngineConfig(n_cfm_timesteps=3))
    slow = S3GenEngine(fresh_s3gen("tiny"), S3GenEngineConfig(n_cfm_timesteps=3, fast_estimator=False))
    assert isinstance(fast.flow.estimator_fn, FastEstimator) and not isinstance(slow.flow.estimator_fn, FastEstimator)
    a = fast.vocode([VocodeInput(tokens, voice, seed=5)])[0]
    b = slow.vocode([VocodeInput(tokens, voice, seed=5)])[0]
    assert a.shape == b.shape
    torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b), atol=1e-4, rtol=0)


def test_hift_length_bucket_padding_is_masked_out():
    hift = fresh_s3gen("tiny").mel2wav.eval()
    g = torch.Generator().manual_seed(1)
    mels = [torch.randn(80, n, generator=g) - 5 for n in (13, 21)]
    exact = HiftRunner(hift, length_bucket=1)([HiftRow(m, seed=i) for i, m in enumerate(mels)])
    padded = HiftRunner(hift, length_bucket=16)([HiftRow(m, seed=i) for i, m in enumerate(mels)])
    for w0, w1 in zip(exact[0], padded[0]):
        assert w0.shape == w1.shape
        torch.testing.assert_close(w1, w0, atol=1e-5, rtol=1e-4)


def test_folding_hift_weight_norm_keeps_its_output():
    from serve_app.engine.s3gen.vocoder import fold_weight_norm

    import copy

    hift = fresh_s3gen("tiny").mel2wav.eval()
    twin = copy.deepcopy(hift)                                            # shares the parametrized classes
    mel = torch.randn(80, 20, generator=torch.Generator().manual_seed(3)) - 5
    before = HiftRunner(hift)([HiftRow(mel, seed=1)])[0][0]
    assert fold_weight_norm(hift) > 10
    assert fold_weight_norm(hift) == 0                                    # nothing left to fold
    assert not any("Parametrized" in type(m).__name__ for m in hift.modules())
    after = HiftRunner(hift)([HiftRow(mel, seed=1)])[0][0]
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(HiftRunner(twin)([HiftRow(mel, seed=1)])[0][0], before)   # the copy still works


def test_batched_istft_equals_torch_istft_per_row():
    """HiFT's batched iSTFT (no host sync) == torch.istft of each row alone, with HiFT's own window."""
    from serve_app.engine.s3gen.vocoder import istft_rows

    hift = fresh_s3gen("tiny").mel2wav
    n_fft, hop = hift.istft_params["n_fft"], hift.istft_params["hop_len"]
    window = hift.stft_window.float()
    g = torch.Generator().manual_seed(0)
    frames = [61, 40, 9, 2]
    spec = torch.complex(torch.randn(4, n_fft // 2 + 1, 61, generator=g), torch.randn(4, n_fft // 2 + 1, 61, generator=g))
    out = istft_rows(spec, torch.tensor(frames), n_fft, hop, window)
    assert out.shape == (4, hop * 60)
    for i, n in enumerate(frames):
        ref = torch.istft(spec[i:i + 1, :, :n], n_fft, hop, n_fft, window=window)[0]
        torch.testing.assert_close(out[i, :hop * (n - 1)], ref, atol=1e-5, rtol=1e-5)


def test_warmup_captures_the_shapes_a_first_chunk_uses():
    """Warm-up at replica start must capture exactly the shapes a new stream's first chunk then replays
    (graphs replaced by recording fakes: CPU)."""
    from test_s3gen_graphs import RecordingGraphs

    from serve_app.engine.s3gen import StreamState

    eng = S3GenEngine(fresh_s3gen("tiny"), S3GenEngineConfig(n_cfm_timesteps=2))
    eng.use_graphs = True
    eng.flow.graphs = RecordingGraphs(eng.flow.core, (1, 2, 4), max_graphs=8, capture_after=2, name="flow")
    eng.hift.graphs = RecordingGraphs(eng.hift.trunk, (1, 2, 4), max_graphs=8, capture_after=2, name="hift")
    builtin, other = random_voice(10, 1), random_voice(12, 2)          # prompts in the same length bucket
    assert eng.warmup(builtin, first_chunk_tokens=8, batch_sizes=(1, 2), progress=False) == 4
    assert eng.flow.graphs.captures == 2 and eng.hift.graphs.captures == 2
    audio, state = eng.vocode_stream_step(random_tokens(8, 9), other, None, finalize=False, seed=3)
    assert audio.size > 0 and isinstance(state, StreamState)
    assert eng.flow.graphs.captures == 2 and eng.hift.graphs.captures == 2   # replayed, nothing new captured
    assert not eng.flow.graphs.seen and not eng.hift.graphs.seen


def test_graph_grid_captured_ahead_covers_a_mixed_step():
    """`capture_graphs` captures every (batch bucket, length bucket) within the limits; a later step of stream
    first chunks and one-shot decodes then only replays (recording fakes: CPU)."""
    from test_s3gen_graphs import RecordingGraphs

    from serve_app.engine.s3gen import StreamState

    eng = S3GenEngine(fresh_s3gen("tiny"), S3GenEngineConfig(n_cfm_timesteps=2, length_bucket=32,
                                                             hift_length_bucket=16, graph_max_tokens=128))
    eng.use_graphs = True
    eng.flow.graphs = RecordingGraphs(eng.flow.core, (1, 2, 4), max_graphs=64, capture_after=1, name="flow",
                                      max_size=128)
    eng.hift.graphs = RecordingGraphs(eng.hift.trunk, (1, 2, 4), max_graphs=64, capture_after=1, name="hift",
                                      max_size=128)
    n = eng.capture_graphs(max_tokens=64, max_frames=64, progress=False)
    # flow: L in (32, 64) x b in (1, 2, 4) with b * L <= 128 -> 5; HiFT: M in 16..64 x b with b * M <= 128 -> 10
    assert (eng.flow.graphs.captures, eng.hift.graphs.captures, n) == (5, 10, 15)
    assert eng.capture_graphs(max_tokens=64, max_frames=64, progress=False) == 0     # already held
    voice = random_voice(10, 1)
    out = eng.step([VocodeInput(random_tokens(8, 2), voice, seed=1, finalize=False, stream_state=StreamState()),
                    VocodeInput(random_tokens(14, 3), voice, seed=2)])
    assert all(a.size > 0 and np.isfinite(a).all() for a, _ in out)
    assert (eng.flow.graphs.captures, eng.hift.graphs.captures) == (5, 10)            # replayed only
    assert not eng.flow.graphs.seen and not eng.hift.graphs.seen
    assert eng.stats.num_flow_calls >= 1 and eng.stats.flow_padding_ratio >= 1.0


def test_stage_warm_up_only_on_gpu_engine_replicas():
    from serve_app.serving.config import S3GenSettings
    from serve_app.serving.stages.s3gen_backend import EngineS3GenBackend
    from serve_app.serving.stages.s3gen_stage import warm_up

    backend = EngineS3GenBackend(S3GenEngine(fresh_s3gen("tiny"), S3GenEngineConfig(n_cfm_timesteps=2)), "cpu",
                                 torch.float32)
    assert warm_up(backend, None, S3GenSettings(), "cpu") == 0
    assert warm_up(backend, None, S3GenSettings(warmup_batch_sizes=[]), "cuda") == 0
    assert warm_up(backend, object(), S3GenSettings(), "cuda") == 0     # no built-in voice: skipped


def _compute_ops(fn, *args) -> int:
    """aten ops a call dispatches, views and metadata ops excluded (a CPU proxy for CUDA kernels a call)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    views = {"view", "_unsafe_view", "transpose", "permute", "unsqueeze", "squeeze", "expand", "slice", "select",
             "as_strided", "unbind", "t", "alias", "split", "chunk", "detach", "reshape", "unfold",
             "split_with_sizes", "_reshape_alias"}

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in views:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with torch.inference_mode(), Count():
        fn(*args)
    return Count.n


@pytest.mark.parametrize("preset,max_ratio", [("tiny", 0.65), pytest.param("full", 0.6, marks=pytest.mark.slow)])
def test_fast_estimator_dispatches_fewer_ops(preset, max_ratio):
    """The point of FastEstimator: fewer kernels a call (measured on an H100: 1,464 -> 943 CUDA kernels before
    the interior masks were dropped; here aten ops on CPU, full preset 1,362 -> 748)."""
    use_sync_free_masks()
    est = fresh_s3gen(preset).flow.decoder.estimator
    inputs = _estimator_inputs(3, 48, torch.float32)
    up, fast = _compute_ops(est, *inputs), _compute_ops(FastEstimator(est), *inputs)
    assert fast <= max_ratio * up, (fast, up)


def test_hift_snake_matches_upstream_module():
    hift = fresh_s3gen("tiny").mel2wav.eval()
    runner = HiftRunner(hift)
    snakes = [m for m in hift.modules() if type(m).__name__ == "Snake"]
    assert len(snakes) == len(runner._snake) > 20
    for snake in snakes[:3]:
        with torch.no_grad():
            snake.alpha.uniform_(0.3, 2.0)
    runner = HiftRunner(hift)                                              # parameters read at construction
    x = torch.randn(2, snakes[0].in_features, 50)
    with torch.inference_mode():
        torch.testing.assert_close(runner._act(snakes[0], x), snakes[0](x))


def test_to_device_copies_values_and_dtypes():
    import numpy as np

    from serve_app.engine.s3gen.transfer import to_device

    arr = np.arange(5, dtype=np.int32)
    t = to_device(arr, "cpu", torch.long)
    arr[0] = 99                                                           # converted on the host: a copy
    assert t.dtype == torch.long and t.tolist() == [0, 1, 2, 3, 4]
    assert to_device([[1, 2], [3, 4]], "cpu").shape == (2, 2)
    assert to_device(torch.ones(3), "cpu", torch.float16).dtype == torch.float16

