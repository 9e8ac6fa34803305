"""fastdl.nn Transformer layers and stacks as drop-ins for torch.nn's.

A torch module's state_dict is loaded into fastdl's; outputs and the gradients of the inputs and
of every parameter are compared with the torch module run in float64 (fp32 within 2e-4 relative,
fp16 within 3x torch's own fp16 error), with dropout 0 in training and eval mode. Post-norm and
pre-norm, relu and gelu, batch_first or not, unbatched, causal masks (bool and float, the hint
and its detection), key padding. Dropout > 0: seeds reproduce, eval is deterministic, padding
is respected. Tiny sizes: the interpreter runs the real kernels.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.utils.prune
from helpers import assert_close, check_module

import fastdl

RTOL = 2e-4
# torch's reference modules warn about mixed bool/float masks and about their nested-tensor path.
pytestmark = [pytest.mark.filterwarnings("ignore:Support for mismatched"),
              pytest.mark.filterwarnings("ignore:enable_nested_tensor is True"),
              pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")]
D, FF, N, S, T = 32, 40, 2, 6, 5


def _randomize(module):
    """Nonzero biases and non-trivial LayerNorm affines, so every parameter matters."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:
                center = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(center + 0.3 * torch.randn_like(p))
    return module


def _pair(name, *args, device, dtype=torch.float32, **kwargs):
    ref = _randomize(getattr(torch.nn, name)(*args, device=device, dtype=dtype, **kwargs))
    ours = getattr(fastdl.nn, name)(*args, device=device, dtype=dtype, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _seq(length, batch_first, device, dtype=torch.float32):
    x = torch.randn(length, N, D, device=device, dtype=dtype)
    return x.transpose(0, 1).contiguous() if batch_first else x


def _kpm(length, device):
    """True at padding: the second sequence is 3 shorter."""
    mask = torch.zeros(N, length, dtype=torch.bool, device=device)
    mask[1, length - 3:] = True
    return mask


def _causal(length, device, dtype=torch.bool):
    return torch.nn.Transformer.generate_square_subsequent_mask(length, device=device).to(dtype) \
        if dtype != torch.bool else torch.ones(length, length, dtype=torch.bool, device=device).triu(1)


@pytest.fixture
def torch_path():
    """Plumbing tests run on the torch path; the kernels are covered by the backend-parametrized
    tests."""
    with fastdl.backend.use("torch"):
        yield


# -- layers -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_first,activation,batch_first,training", [
    (False, "relu", False, False), (True, "gelu", True, True), (False, "gelu", True, True),
    (True, "relu", False, False)])
def test_encoder_layer(backend, device, norm_first, activation, batch_first, training):
    """Dropout 0 in training mode runs the training code path (fused dropout with p = 0)."""
    ours, ref = _pair("TransformerEncoderLayer", D, 2, FF, 0.0, activation, norm_first=norm_first,
                      batch_first=batch_first, device=device)
    ours.train(training)
    ref.train(training)
    src = _seq(S, batch_first, device)
    check_module(ours, ref, lambda m, x, c, p: m(x, src_mask=c, src_key_padding_mask=p, is_causal=True),
                 [src], [_causal(S, device), _kpm(S, device)])


@pytest.mark.parametrize("norm_first,activation,batch_first", [
    (False, "relu", True), (True, "gelu", False)])
def test_decoder_layer(backend, device, norm_first, activation, batch_first):
    ours, ref = _pair("TransformerDecoderLayer", D, 2, FF, 0.0, activation, norm_first=norm_first,
                      batch_first=batch_first, device=device)
    tgt, memory = _seq(T, batch_first, device), _seq(S, batch_first, device)
    memory_mask = torch.rand(T, S, device=device) < 0.3
    memory_mask[:, 0] = False
    check_module(ours, ref, lambda m, t, mem, c, tp, mm, mp: m(
        t, mem, tgt_mask=c, memory_mask=mm, tgt_key_padding_mask=tp, memory_key_padding_mask=mp,
        tgt_is_causal=True), [tgt, memory],
        [_causal(T, device, torch.float32), _kpm(T, device), memory_mask, _kpm(S, device)])


def test_unbatched_layer(backend, device):
    ours, ref = _pair("TransformerDecoderLayer", D, 2, FF, 0.0, norm_first=True, device=device)
    check_module(ours, ref, lambda m, t, mem, c: m(t, mem, tgt_mask=c, tgt_is_causal=True),
             [torch.randn(T, D, device=device), torch.randn(S, D, device=device)], [_causal(T, device)])


def test_callable_activation_and_no_bias(backend, device):
    ours, ref = _pair("TransformerEncoderLayer", D, 2, FF, 0.0, torch.nn.functional.silu, bias=False,
                      layer_norm_eps=1e-3, device=device)
    check_module(ours, ref, lambda m, x, p: m(x, src_key_padding_mask=p), [_seq(S, False, device)],
             [_kpm(S, device)])


def test_fp16_encoder_layer(backend, device):
    ours, ref = _pair("TransformerEncoderLayer", D, 2, FF, 0.0, batch_first=True, device=device,
                      dtype=torch.float16)
    check_module(ours, ref, lambda m, x, c: m(x, src_mask=c, is_causal=True),
             [_seq(S, True, device, torch.float16)], [_causal(S, device)], rtol=None)


# -- stacks -----------------------------------------------------------------------------------------

def _stacks(device, norm_first, batch_first, layers=2):
    torch.manual_seed(1)
    ref = _randomize(torch.nn.Transformer(D, 2, layers, layers, FF, 0.0, norm_first=norm_first,
                                          batch_first=batch_first, device=device))
    ours = fastdl.nn.Transformer(D, 2, layers, layers, FF, 0.0, norm_first=norm_first,
                                 batch_first=batch_first, device=device)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


@pytest.mark.parametrize("norm_first,batch_first,mask_dtype", [
    (False, True, torch.bool), (True, False, torch.float32)])
def test_encoder_stack(backend, device, norm_first, batch_first, mask_dtype):
    """is_causal=None: the causal mask is detected, as torch does (and a float mask is equal to a
    bool one)."""
    ours, ref = _stacks(device, norm_first, batch_first)
    check_module(ours.encoder, ref.encoder, lambda m, x, c, p: m(x, mask=c, src_key_padding_mask=p),
             [_seq(S, batch_first, device)], [_causal(S, device, mask_dtype), _kpm(S, device)])


def test_transformer(backend, device):
    ours, ref = _stacks(device, norm_first=False, batch_first=True, layers=1)
    src, tgt = _seq(S, True, device), _seq(T, True, device)
    check_module(ours, ref, lambda m, s, t, c, sp, tp: m(
        s, t, tgt_mask=c, src_key_padding_mask=sp, tgt_key_padding_mask=tp, memory_key_padding_mask=sp),
        [src, tgt], [_causal(T, device), _kpm(S, device), _kpm(T, device)])


def test_causal_detection(torch_path, monkeypatch):
    """The stacks pass is_causal=True to their layers exactly when the mask is the causal one."""
    seen = []
    real = fastdl.nn.MultiheadAttention.forward

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("is_causal"))
        return real(self, *args, **kwargs)
    monkeypatch.setattr(fastdl.nn.MultiheadAttention, "forward", spy)
    model = fastdl.nn.Transformer(D, 2, 1, 1, FF, 0.0)
    src, tgt = torch.randn(S, N, D), torch.randn(T, N, D)
    model(src, tgt, src_mask=_causal(S, "cpu"), tgt_mask=_causal(T, "cpu", torch.float32))
    assert seen == [True, True, False]  # encoder self, decoder self, decoder cross
    seen.clear()
    not_causal = _causal(T, "cpu").clone()
    not_causal[0, 1] = False
    model(src, tgt, tgt_mask=not_causal)
    assert seen == [False, False, False]
    seen.clear()
    model(src, tgt, tgt_mask=_causal(T, "cpu"), tgt_is_causal=False)
    assert seen == [False, False, False]


# -- dropout -----------------------------------------------------------------------------------------

def test_dropout_training(backend, device):
    """Dropout on: a seed reproduces the output and the gradients; another seed or eval mode
    differs; eval mode equals the same model built with dropout 0."""
    model = fastdl.nn.TransformerEncoderLayer(D, 2, FF, dropout=0.3, batch_first=True, device=device)
    x = _seq(S, True, device).requires_grad_()
    runs = []
    for seed in (5, 5):
        torch.manual_seed(seed)
        out = model(x, src_key_padding_mask=_kpm(S, device))
        runs.append((out, torch.autograd.grad(out.square().sum(), x)[0]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    torch.manual_seed(6)
    with torch.no_grad():
        assert not torch.allclose(runs[0][0], model(x, src_key_padding_mask=_kpm(S, device)))
        clean = model.eval()(x)
    assert not torch.allclose(runs[0][0], clean)
    no_dropout = fastdl.nn.TransformerEncoderLayer(D, 2, FF, dropout=0.0, batch_first=True, device=device)
    no_dropout.load_state_dict(model.state_dict())
    assert torch.equal(no_dropout.train()(x), clean)


def test_dropout_keeps_padding_out(backend, device):
    """In training, changing padded positions changes nothing at the other positions."""
    model = fastdl.nn.TransformerEncoderLayer(D, 2, FF, dropout=0.2, batch_first=True, device=device)
    src, pad = _seq(S, True, device), _kpm(S, device)
    changed = src.clone()
    changed[pad] = torch.randn_like(changed[pad]) * 10
    outs = []
    for x in (src, changed):
        torch.manual_seed(3)
        outs.append(model(x, src_key_padding_mask=pad)[~pad])
    assert_close("unpadded output", outs[1], outs[0].double(), rtol=1e-5)


# -- drop-in surface ---------------------------------------------------------------------------------

def test_same_init_state_dict_and_modules():
    """Same seed -> same parameters as torch, and the random stream after construction agrees;
    state_dict keys in torch's order, loadable both ways; fastdl submodules inside."""
    torch.manual_seed(0)
    ref = torch.nn.Transformer(D, 2, 2, 1, FF, activation="gelu", norm_first=True, batch_first=True)
    after_ref = torch.rand(3)
    torch.manual_seed(0)
    ours = fastdl.nn.Transformer(D, 2, 2, 1, FF, activation="gelu", norm_first=True, batch_first=True)
    after_ours = torch.rand(3)
    assert torch.equal(after_ref, after_ours)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))
    ref.load_state_dict(ours.state_dict())
    assert isinstance(ours, torch.nn.Transformer)
    for layer in list(ours.encoder.layers) + list(ours.decoder.layers):
        assert type(layer) in (fastdl.nn.TransformerEncoderLayer, fastdl.nn.TransformerDecoderLayer)
        assert type(layer.self_attn) is fastdl.nn.MultiheadAttention
        assert type(layer.norm1) is fastdl.nn.LayerNorm and type(layer.dropout1) is fastdl.nn.Dropout
    assert type(ours.encoder.norm) is fastdl.nn.LayerNorm
    assert type(ours.decoder.layers[0].multihead_attn) is fastdl.nn.MultiheadAttention
    first, second = (layer.self_attn.in_proj_weight for layer in ours.encoder.layers)
    assert first is not second
    mask = ours.generate_square_subsequent_mask(4)
    assert torch.equal(mask, torch.nn.Transformer.generate_square_subsequent_mask(4))


def test_layer_signatures_are_torchs():
    import inspect
    for name in ("TransformerEncoderLayer", "TransformerDecoderLayer"):
        ours, theirs = (inspect.signature(getattr(m, name).__init__) for m in (fastdl.nn, torch.nn))
        assert [(p.name, p.default, p.kind) for p in ours.parameters.values()] == \
               [(p.name, p.default, p.kind) for p in theirs.parameters.values()]
        assert type(torch.nn.utils.skip_init(getattr(fastdl.nn, name), D, 2)) is getattr(fastdl.nn, name)


@pytest.mark.parametrize("norm_first", [False, True])
def test_submodule_hooks_and_overrides_run_as_in_torch(backend, device, norm_first):
    """A hooked, subclassed or pruned norm/dropout is called, not fused away: the same hooks fire
    in the same order as in torch, and the layer's output is the one torch computes."""
    class DoubledNorm(torch.nn.LayerNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    ours, ref = _pair("TransformerEncoderLayer", D, 2, FF, 0.0, device=device, norm_first=norm_first)
    calls = {id(ours): [], id(ref): []}
    for layer in (ours, ref):
        for name in ("dropout1", "norm1", "dropout2", "norm2"):
            getattr(layer, name).register_forward_hook(
                lambda m, i, o, name=name, layer=layer: calls[id(layer)].append(name))
    x = _seq(S, False, device)
    ours(x), ref(x)
    assert calls[id(ours)] == calls[id(ref)] and len(calls[id(ref)]) == 4
    for layer in (ours, ref):
        doubled = DoubledNorm(D, device=device)
        doubled.load_state_dict(layer.norm2.state_dict())
        layer.norm2 = doubled
    torch.nn.utils.prune.l1_unstructured(ours.norm1, "weight", amount=0.5)
    torch.nn.utils.prune.l1_unstructured(ref.norm1, "weight", amount=0.5)
    for _ in range(2):  # a pruned weight is recomputed by its hook on every call
        out = ours(x)
        out.sum().backward()
    assert_close("output", out, ref.double()(x.double()), rtol=RTOL)


def _with_own_blocks(base):
    """A subclass of ``base`` (a torch or fastdl layer) overriding torch's private blocks, as user
    code does: a scaled feed-forward block, and a self-attention block that records its masks."""
    class Layer(base):
        seen = []

        def _sa_block(self, x, attn_mask, key_padding_mask, is_causal=False):
            Layer.seen.append((None if attn_mask is None else attn_mask.dtype,
                               None if key_padding_mask is None else key_padding_mask.dtype))
            return 0.5 * super()._sa_block(x, attn_mask, key_padding_mask, is_causal)

        def _ff_block(self, x):
            return torch.tanh(super()._ff_block(x))
    return Layer


@pytest.mark.parametrize("norm_first", [False, True])
def test_overridden_blocks_run_as_in_torch(backend, device, norm_first):
    """torch's layers call their private ``_sa_block`` / ``_mha_block`` / ``_ff_block``; a subclass
    overriding one gets torch's composition of the blocks (and torch's canonical masks), forward
    and backward, instead of the fused forward that would skip it."""
    ref = _randomize(_with_own_blocks(torch.nn.TransformerEncoderLayer)(D, 2, FF, 0.0, norm_first=norm_first,
                                                                        device=device))
    ours = _with_own_blocks(fastdl.nn.TransformerEncoderLayer)(D, 2, FF, 0.0, norm_first=norm_first,
                                                               device=device)
    ours.load_state_dict(ref.state_dict())
    src = _seq(S, False, device)
    check_module(ours, ref, lambda m, x, p: m(x, src_key_padding_mask=p), [src], [_kpm(S, device)])
    type(ours).seen.clear(), type(ref).seen.clear()
    ours(src, src_key_padding_mask=_kpm(S, device)), ref(src, src_key_padding_mask=_kpm(S, device))
    assert type(ours).seen == type(ref).seen == [(None, torch.float32)]

    def decoder(base):
        class Decoder(base):
            def _mha_block(self, x, mem, attn_mask, key_padding_mask, is_causal=False):
                return -super()._mha_block(x, mem, attn_mask, key_padding_mask, is_causal)
        return Decoder

    ref = _randomize(decoder(torch.nn.TransformerDecoderLayer)(D, 2, FF, 0.0, norm_first=norm_first,
                                                               device=device))
    ours = decoder(fastdl.nn.TransformerDecoderLayer)(D, 2, FF, 0.0, norm_first=norm_first, device=device)
    ours.load_state_dict(ref.state_dict())
    tgt, memory = _seq(T, False, device), _seq(S, False, device)
    check_module(ours, ref, lambda m, t, mem, c: m(t, mem, tgt_mask=c, tgt_is_causal=True), [tgt, memory],
                 [_causal(T, device, torch.float32)])


def test_a_block_replaced_on_one_instance_runs(backend, device):
    """A block monkeypatched on one layer instance is called, as torch's forward calls it."""
    import types
    ref = _randomize(torch.nn.TransformerEncoderLayer(D, 2, FF, 0.0, device=device))
    ours = fastdl.nn.TransformerEncoderLayer(D, 2, FF, 0.0, device=device)
    ours.load_state_dict(ref.state_dict())
    def block(self, x):
        return -3.0 * self.linear2(self.activation(self.linear1(x)))

    for layer in (ours, ref):
        layer._ff_block = types.MethodType(block, layer)
    x = _seq(S, False, device)
    assert_close("output", ours(x), ref.double()(x.double()), rtol=RTOL)


def test_custom_encoder_decoder(torch_path):
    encoder = fastdl.nn.TransformerEncoder(fastdl.nn.TransformerEncoderLayer(D, 2, FF, 0.0), 1)
    decoder = fastdl.nn.TransformerDecoder(fastdl.nn.TransformerDecoderLayer(D, 2, FF, 0.0), 2)
    model = fastdl.nn.Transformer(D, 2, custom_encoder=encoder, custom_decoder=decoder)
    assert model.encoder is encoder and model.decoder is decoder
    assert len(model.encoder.layers) == 1 and model.encoder.norm is None
    src, tgt = torch.randn(S, N, D), torch.randn(T, N, D)
    assert_close("output", model(src, tgt), decoder(tgt, encoder(src)).double(), rtol=1e-6)


def test_nested_tensor_option_accepted_not_used(torch_path):
    """enable_nested_tensor is stored but never used: no warning, and padded positions are
    computed (torch's nested fast path would zero them)."""
    layer = fastdl.nn.TransformerEncoderLayer(D, 2, FF, 0.0, batch_first=True, norm_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder = fastdl.nn.TransformerEncoder(layer, 1, enable_nested_tensor=True).eval()
    assert encoder.enable_nested_tensor and not encoder.use_nested_tensor
    x = torch.randn(N, S, D)
    with torch.no_grad():
        out = encoder(x, src_key_padding_mask=_kpm(S, "cpu"))
    assert out[1, -1].abs().sum() > 0


def test_layers_inside_torch_encoder(torch_path):
    """fastdl layers in torch.nn.TransformerEncoder, whose inference path nests a padded batch:
    the same output as torch's layers."""
    ours = torch.nn.TransformerEncoder(fastdl.nn.TransformerEncoderLayer(D, 2, FF, 0.0, batch_first=True), 2)
    ref = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(D, 2, FF, 0.0, batch_first=True), 2)
    ref.load_state_dict(ours.state_dict())
    x, pad = _seq(S, True, "cpu"), _kpm(S, "cpu")
    with torch.no_grad():
        assert_close("output", ours.eval()(x, src_key_padding_mask=pad),
                     ref.eval()(x, src_key_padding_mask=pad).double(), rtol=1e-6)


def test_float_mask_in_inference_as_torchs_regular_path(backend, device):
    """README, Parity: in evaluation without grad, torch's encoder layer runs its fused fast path,
    which returns NaN for a float mask of random values on CPU (PyTorch 2.13); fastdl's layer
    computes what torch's regular path (taken with grad) computes."""
    torch.manual_seed(0)
    ref = torch.nn.TransformerEncoderLayer(D, 2, FF, 0.0, batch_first=True, device=device).eval()
    ours = fastdl.nn.TransformerEncoderLayer(D, 2, FF, 0.0, batch_first=True, device=device).eval()
    ours.load_state_dict(ref.state_dict())
    x, mask = _seq(S, True, device), torch.randn(S, S, device=device)
    want = copy.deepcopy(ref).double()(x.double(), src_mask=mask.double())  # with grad: regular path
    with torch.no_grad():
        got = ours(x, src_mask=mask)
    assert_close("output", got, want)


def test_mask_errors(torch_path):
    layer = fastdl.nn.TransformerEncoderLayer(D, 2, FF, 0.0)
    x = torch.randn(S, N, D)
    with pytest.raises(ValueError, match="attn_mask"):
        layer(x, src_mask=torch.zeros(S, S + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask"):
        layer(x, src_key_padding_mask=torch.zeros(N + 1, S, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        layer(x, is_causal=True)
