"""RMT, a robust multimodal transformer for pneumonia severity from a chest X-ray and clinical text.

The architecture follows MMBT (Kiela et al., 2019, "Supervised Multimodal Bitransformers for
Classifying Images and Text"). A CNN feature map is average-pooled into a few regions, and each region
is projected to the width of a BERT encoder. The resulting image embeddings join the text tokens in
one input sequence. RMT adds three CLS tokens (image, text, multimodal), mask attention, and a
multi-task loss over one linear head per CLS. A sample without its X-ray or its notes is then
classified by the head that matches the modalities it has.

Joint sequence (length 1 + (N + 1) + L, N image embeddings, L text tokens including the text CLS):

    [multimodal CLS] [image CLS] [image_1 .. image_N] [text CLS = tokenizer CLS] [text tokens ..]
    position ids:   0            0        1 .. N               0                  1 .. L - 1
    token types:    0            0        0 .. 0               1                  1 .. 1

The image side and the text side each restart their position ids at 0, as MMBT does, so that the text
side sees exactly the positions a pretrained BERT saw.
"""

from dataclasses import dataclass

import timm
import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.modeling_outputs import ModelOutput

try:
    from .configuration_rmt import TASKS, RMTConfig
    from .pipeline_rmt import CUSTOM_PIPELINES
except ImportError:  # imported as a top-level module from a source checkout
    from configuration_rmt import TASKS, RMTConfig
    from pipeline_rmt import CUSTOM_PIPELINES

IMAGE_PRESENT, TEXT_PRESENT = 0, 1

AUTO_MAP = {
    "AutoConfig": "configuration_rmt.RMTConfig",
    "AutoModel": "modeling_rmt.RMTModel",
    "AutoModelForSequenceClassification": "modeling_rmt.RMTForMultimodalClassification",
}


@dataclass
class RMTModelOutput(ModelOutput):
    """
    Output of [`RMTModel`].

    Args:
        image_cls_state (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            Final state of the image CLS.
        text_cls_state (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            Final state of the text CLS.
        multimodal_cls_state (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            Final state of the multimodal CLS.
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
            Final states of the whole joint sequence from the multimodal pass.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            States of the multimodal pass after the embeddings and after each layer, returned with
            `output_hidden_states=True`.
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            Attention weights of the multimodal pass, one `(batch_size, num_heads, sequence_length,
            sequence_length)` tensor per layer, returned with `output_attentions=True` and the eager attention.
        modality_mask (`torch.BoolTensor` of shape `(batch_size, 2)`):
            The validated modality mask: column 0 image present, column 1 text present.
        routed_cls_state (`torch.FloatTensor` of shape `(batch_size, hidden_size)`, *optional*):
            Per sample, the state of the CLS whose head classifies it. Returned instead of the three CLS states,
            the sequence states, the hidden states and the attentions when the model runs with `routed_only=True`.
    """

    image_cls_state: torch.FloatTensor | None = None
    text_cls_state: torch.FloatTensor | None = None
    multimodal_cls_state: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    modality_mask: torch.BoolTensor | None = None
    routed_cls_state: torch.FloatTensor | None = None


@dataclass
class RMTClassifierOutput(ModelOutput):
    """
    Output of [`RMTForMultimodalClassification`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Task-weighted sum of the image, text and multimodal cross-entropies, returned with `labels`.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            Per sample, the logits of the head that matches its `modality_mask`: image head for image-only
            samples, text head for text-only samples, multimodal head for complete samples. With
            `use_multitask=False` every sample is answered by the multimodal head.
        image_logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            Image-head logits. For a sample without an image they are a constant of the weights.
        text_logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            Text-head logits. For a sample without text they are a constant of the weights.
        multimodal_logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            Multimodal-head logits, computed with the absent modality masked.

            With `routed_only=True` the three head logits are None: only `logits` is computed.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            See [`RMTModelOutput`].
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            See [`RMTModelOutput`].
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    image_logits: torch.FloatTensor | None = None
    text_logits: torch.FloatTensor | None = None
    multimodal_logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def pooling_grid(num_regions: int) -> tuple[int, int]:
    """Return `(rows, columns)` with `rows * columns == num_regions`, as square as possible, rows first.

    A prime count gives horizontal bands (3 -> upper, middle and lower lung zones).
    """
    columns = max(d for d in range(1, int(num_regions**0.5) + 1) if num_regions % d == 0)
    return num_regions // columns, columns


class RMTImageEncoder(nn.Module):
    """CNN feature map pooled into `num_image_embeddings` regions and projected to the encoder width.

    Equivalent to MMBT's image encoder with any timm backbone in place of the fixed ResNet-152. The pooled
    regions before the projection are the image features: `(batch, num_image_embeddings, feature_size)`.
    With `config.freeze_image_backbone` the CNN gets no gradient and stays in eval mode, so an image's
    features depend on the image and the CNN weights only, and an `ImageFeatureCache` can hold them.
    """

    def __init__(self, config: RMTConfig):
        super().__init__()
        # Pretrained CNN weights are loaded by `RMTForMultimodalClassification.from_backbones`, never here, so
        # that `from_pretrained` does not download weights that the checkpoint already holds.
        self.backbone = timm.create_model(config.image_model_name, pretrained=False, num_classes=0, global_pool="")
        self.pool = nn.AdaptiveAvgPool2d(pooling_grid(config.num_image_embeddings))
        self.projection = nn.Linear(self.backbone.num_features, config.hidden_size)
        self.frozen = config.freeze_image_backbone
        for module in self.backbone.modules():
            module._rmt_timm_initialized = True
        if self.frozen:
            self.backbone.requires_grad_(False)

    @property
    def feature_size(self) -> int:
        """Channels of the CNN feature map, the last dimension of the image features."""
        return self.backbone.num_features

    def train(self, mode: bool = True) -> "RMTImageEncoder":
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Map `(batch, 3, height, width)` pixels to pooled CNN features, `(batch, N, feature_size)`."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            feature_map = self.backbone.forward_features(pixel_values)
            return self.pool(feature_map).flatten(2).transpose(1, 2)

    def forward(self, pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None):
        """Return `(batch, num_image_embeddings, hidden_size)` from pixels, or from precomputed `image_features`."""
        if image_features is None:
            image_features = self.image_features(pixel_values)
        return self.projection(image_features.to(self.projection.weight.dtype))


@dataclass
class JointSequence:
    """Inputs of the encoder for the joint sequence, and where each part sits in it."""

    inputs_embeds: torch.Tensor
    token_type_ids: torch.Tensor
    position_ids: torch.Tensor
    key_visible: torch.Tensor
    image_side: slice
    text_side: slice

    def rows(self, selected: torch.Tensor) -> "JointSequence":
        """Return the sequence of the samples where the `(batch,)` bool tensor `selected` is True."""
        return JointSequence(
            self.inputs_embeds[selected],
            self.token_type_ids[selected],
            self.position_ids[selected],
            self.key_visible[selected],
            self.image_side,
            self.text_side,
        )


class RMTEmbeddings(nn.Module):
    """Token vectors of the joint sequence before the encoder adds its position and token-type embeddings.

    The multimodal and image CLS vectors are learned. Image embeddings come from [`RMTImageEncoder`]. Text
    vectors are the encoder's own word embeddings of `input_ids`, so the text CLS is the tokenizer's CLS
    token. The inputs of an absent modality are replaced by zeros, so they can change no output.
    """

    MULTIMODAL_CLS, IMAGE_CLS = 0, 1

    def __init__(self, config: RMTConfig):
        super().__init__()
        self.image_encoder = RMTImageEncoder(config)
        self.cls_embeddings = nn.Embedding(2, config.hidden_size)
        self.num_image_embeddings = config.num_image_embeddings
        self.hidden_size = config.hidden_size

    def embed_images(
        self, pixel_values: torch.Tensor | None, image_features: torch.Tensor | None, image_present: torch.Tensor
    ) -> torch.Tensor:
        """Return `(batch, N, hidden)` image embeddings, zeros where the image is absent.

        The CNN runs on the present images only, so absent rows never reach its batch-norm statistics. Given
        `image_features`, the CNN does not run at all.
        """
        batch_size = image_present.shape[0]
        dtype = self.cls_embeddings.weight.dtype
        image_embeds = torch.zeros(
            batch_size, self.num_image_embeddings, self.hidden_size, device=image_present.device, dtype=dtype
        )
        if image_present.any() and (pixel_values is not None or image_features is not None):
            if image_features is not None:
                features = self.image_encoder(image_features=image_features[image_present])
            else:
                # NOTE: in training, one present image whose final feature map is 1x1 (about 32 px for a
                # ResNet) leaves batch norm one value per channel, and torch raises. Real inputs are larger.
                features = self.image_encoder(pixel_values[image_present])
            image_embeds = image_embeds.index_put((image_present.nonzero(as_tuple=True)[0],), features.to(dtype))
        return image_embeds

    def forward(
        self,
        word_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        modality_mask: torch.Tensor,
        image_features: torch.Tensor | None = None,
    ) -> JointSequence:
        batch_size, text_length = word_embeds.shape[:2]
        device = word_embeds.device
        image_present = modality_mask[:, IMAGE_PRESENT]
        text_present = modality_mask[:, TEXT_PRESENT]

        cls_ids = torch.tensor([self.MULTIMODAL_CLS, self.IMAGE_CLS], device=device)
        cls_vectors = self.cls_embeddings(cls_ids).unsqueeze(0).expand(batch_size, -1, -1)
        image_embeds = self.embed_images(pixel_values, image_features, image_present)
        text_embeds = word_embeds * text_present[:, None, None].to(cls_vectors.dtype)
        inputs_embeds = torch.cat([cls_vectors, image_embeds, text_embeds], dim=1)

        image_side_length = 1 + self.num_image_embeddings
        image_side = slice(1, 1 + image_side_length)
        text_side = slice(image_side.stop, image_side.stop + text_length)
        position_ids = torch.cat(
            [
                torch.zeros(1, dtype=torch.long, device=device),
                torch.arange(image_side_length, device=device),
                torch.arange(text_length, device=device),
            ]
        ).expand(batch_size, -1)
        token_type_ids = torch.zeros_like(position_ids)
        token_type_ids[:, text_side] = 1

        # Keys of an absent modality are hidden from every query. The multimodal CLS is always visible, so no
        # query row is ever fully masked (which would turn the softmax into NaN).
        text_keys = attention_mask.bool() & text_present[:, None]
        image_keys = image_present[:, None].expand(-1, image_side_length)
        always = torch.ones(batch_size, 1, dtype=torch.bool, device=device)
        key_visible = torch.cat([always, image_keys, text_keys], dim=1)

        return JointSequence(inputs_embeds, token_type_ids, position_ids, key_visible, image_side, text_side)


def additive_attention_mask(key_visibility: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Turn a `(batch, queries or 1, keys)` visibility mask into the additive `(batch, 1, queries or 1, keys)`
    mask that BERT adds to the attention scores (0 where visible, the dtype's minimum where hidden)."""
    hidden = torch.finfo(dtype).min
    additive = torch.zeros(key_visibility.shape, dtype=dtype, device=key_visibility.device)
    return additive.masked_fill(~key_visibility, hidden)[:, None]


def unimodal_key_visibility(sequence: JointSequence) -> torch.Tensor:
    """Return `(batch, length)` key visibility for unimodal attention: the joint one with both side CLS keys shown.

    The side CLS key stays visible even where its modality is absent. Queries of an absent side then
    attend to one fixed key, so their states depend on the weights only, not on the batch's padded length.
    """
    key_visible = sequence.key_visible.clone()
    key_visible[:, sequence.image_side.start] = True
    key_visible[:, sequence.text_side.start] = True
    return key_visible


def structured_key_visibility(sequence: JointSequence) -> torch.Tensor:
    """Return the `(batch, length, length)` query-to-key visibility of the fused mask attention.

    Invariant: an image-side query sees only image-side keys and a text-side query only text-side keys,
    so the image and text sides evolve exactly as in their own passes. The multimodal CLS is the one
    bottleneck that sees the present keys of both sides.
    """
    length = sequence.key_visible.shape[1]
    side_of_position = torch.zeros(length, dtype=torch.long, device=sequence.key_visible.device)
    side_of_position[sequence.image_side] = 1
    side_of_position[sequence.text_side] = 2
    same_side = side_of_position[:, None] == side_of_position[None, :]

    visibility = same_side[None] & unimodal_key_visibility(sequence)[:, None, :]
    visibility[:, 0] = sequence.key_visible
    return visibility


class RMTPreTrainedModel(PreTrainedModel):
    config_class = RMTConfig
    config: RMTConfig
    base_model_prefix = "rmt"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True

    def __init__(self, config: RMTConfig, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        config.auto_map = {**AUTO_MAP, **(getattr(config, "auto_map", None) or {})}
        # With this entry in config.json, `pipeline(model=folder, trust_remote_code=True)` builds `RMTPipeline`.
        # The relative import of pipeline_rmt above makes `save_pretrained` copy that file beside the model.
        config.custom_pipelines = {**CUSTOM_PIPELINES, **(getattr(config, "custom_pipelines", None) or {})}

    def _set_gradient_checkpointing(self, enable: bool = True, *args, **kwargs) -> None:
        """Checkpoint the encoder layers (transformers) and the stages of a trainable CNN (timm) together.

        NOTE: the CNN stages run forward again in the backward pass, in train mode, so batch norm updates its
        running statistics twice per step (an effective momentum of about 0.19 instead of 0.1).
        """
        super()._set_gradient_checkpointing(enable, *args, **kwargs)
        for module in self.modules():
            if isinstance(module, RMTImageEncoder) and not module.frozen:
                module.backbone.set_grad_checkpointing(enable)

    def _init_weights(self, module: nn.Module) -> None:
        # The timm backbone keeps timm's own initialization (e.g. zero-initialized last batch norm of each
        # residual block); everything RMT adds uses the normal initializer of the config.
        if getattr(module, "_rmt_timm_initialized", False):
            return
        super()._init_weights(module)


class RMTModel(RMTPreTrainedModel):
    """RMT without heads: returns the final states of the image, text and multimodal CLS tokens.

    Mask attention, when `config.use_mask_attention` is on, is implemented as three encoder passes:

    - image pass over the image side only: the image CLS sees image keys and nothing else;
    - text pass over the text side only: the text CLS sees text keys and nothing else;
    - multimodal pass over the joint sequence: every query sees the keys of the present modalities.

    Running the unimodal passes on their own subsequences makes the isolation exact at every layer (a
    single pass with a per-query mask would leak text into the image CLS through the image tokens, which
    attend to text from the second layer on). Their cost is the length of their side, so the three passes
    together cost about two joint passes. With mask attention off, one joint pass gives all three CLS states.
    """

    def __init__(self, config: RMTConfig):
        super().__init__(config)
        self.encoder = AutoModel.from_config(config.text_config)
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None
        self.embeddings = RMTEmbeddings(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.encoder.set_input_embeddings(value)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        modality_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        image_features: torch.Tensor | None = None,
        routed_only: bool = False,
        **kwargs,
    ) -> RMTModelOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, text_length)`, *optional*):
                Token ids from the tokenizer, starting with its CLS token. Omit for an image-only batch.
            attention_mask (`torch.LongTensor` of shape `(batch_size, text_length)`, *optional*):
                1 for real text tokens, 0 for padding.
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`, *optional*):
                Processed X-rays. Rows of absent images are ignored. Omit for a text-only batch.
            modality_mask (`torch.Tensor` of shape `(batch_size, 2)`, *optional*):
                Column 0 is 1 where the image is present, column 1 is 1 where the text is present. Defaults
                to the modalities whose inputs are given. A row with both modalities absent is an error.
            image_features (`torch.FloatTensor` of shape `(batch_size, N, feature_size)`, *optional*):
                Pooled CNN features (N = `config.num_image_embeddings`) in place of `pixel_values`, e.g. read
                from an `ImageFeatureCache`. The CNN then does not run. Rows of absent images are ignored.
            routed_only (`bool`, *optional*, defaults to `False`):
                Compute only the CLS state that answers each sample (`routed_cls_state`): the encoder runs
                only the passes those CLS tokens need, on the samples that need them. Meant for inference.
        """
        input_ids, attention_mask, modality_mask = self._complete_inputs(
            input_ids, attention_mask, pixel_values, modality_mask, image_features
        )
        word_embeds = self.get_input_embeddings()(input_ids)
        sequence = self.embeddings(word_embeds, attention_mask, pixel_values, modality_mask, image_features)
        if routed_only:
            if output_attentions or output_hidden_states:
                raise ValueError("routed_only=True returns no attentions or hidden states; run without it for them.")
            routed_state = self._routed_cls_state(sequence, modality_mask)
            return RMTModelOutput(routed_cls_state=routed_state, modality_mask=modality_mask)

        joint = self._encode(
            sequence, slice(None), output_attentions, output_hidden_states, self._joint_key_visibility(sequence)
        )
        states = joint.last_hidden_state
        if self.config.use_mask_attention and self.config.attention_strategy == "per_task":
            image_cls_state = self._encode_unimodal(sequence, sequence.image_side)
            text_cls_state = self._encode_unimodal(sequence, sequence.text_side)
        else:
            image_cls_state = states[:, sequence.image_side.start]
            text_cls_state = states[:, sequence.text_side.start]

        return RMTModelOutput(
            image_cls_state=image_cls_state,
            text_cls_state=text_cls_state,
            multimodal_cls_state=states[:, 0],
            last_hidden_state=states,
            hidden_states=getattr(joint, "hidden_states", None),
            attentions=getattr(joint, "attentions", None),
            modality_mask=modality_mask,
        )

    def _joint_key_visibility(self, sequence: JointSequence) -> torch.Tensor:
        """Key visibility of the pass over the whole joint sequence, `(batch, queries or 1, keys)`."""
        if self.config.use_mask_attention and self.config.attention_strategy == "fused":
            return structured_key_visibility(sequence)
        return sequence.key_visible[:, None, :]

    def _routed_cls_state(self, sequence: JointSequence, modality_mask: torch.Tensor) -> torch.Tensor:
        """Return `(batch, hidden)`: each sample's routed CLS state, from the cheapest pass that gives it exactly.

        With mask attention, an image-only sample runs the image side alone and a text-only sample the text side
        alone. Only complete samples run the joint pass. Without mask attention every CLS reads the joint pass,
        so it runs once for the whole batch.
        """
        routed_task = routed_tasks(modality_mask, self.config.use_multitask)
        if not self.config.use_mask_attention:
            states = self._encode(sequence, slice(None), key_visibility=self._joint_key_visibility(sequence))
            cls_positions = torch.tensor(
                [sequence.image_side.start, sequence.text_side.start, 0], device=routed_task.device
            )
            return states.last_hidden_state[torch.arange(len(routed_task)), cls_positions[routed_task]]

        routed_state = sequence.inputs_embeds.new_zeros(len(routed_task), sequence.inputs_embeds.shape[-1])
        for task, task_name in enumerate(TASKS):
            selected = routed_task == task
            if not selected.any():
                continue
            part = sequence.rows(selected)
            if task_name == "image":
                state = self._encode_unimodal(part, part.image_side)
            elif task_name == "text":
                state = self._encode_unimodal(part, part.text_side)
            else:
                state = self._encode(part, slice(None), key_visibility=self._joint_key_visibility(part))
                state = state.last_hidden_state[:, 0]
            routed_state = routed_state.index_put((selected.nonzero(as_tuple=True)[0],), state)
        return routed_state

    def _encode_unimodal(self, sequence: JointSequence, side: slice) -> torch.Tensor:
        """Encode one modality's side alone and return its CLS state, `(batch, hidden)`."""
        key_visible = unimodal_key_visibility(sequence)[:, side]
        return self._encode(sequence, side, key_visibility=key_visible[:, None, :]).last_hidden_state[:, 0]

    def _encode(
        self,
        sequence: JointSequence,
        part: slice,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        key_visibility: torch.Tensor | None = None,
    ):
        """Run the encoder on `sequence[part]`; `key_visibility` is `(batch, queries or 1, keys)` bool."""
        inputs_embeds = sequence.inputs_embeds[:, part]
        record_kwargs = {}
        if output_attentions:
            record_kwargs["output_attentions"] = True
        if output_hidden_states:
            record_kwargs["output_hidden_states"] = True
        return self.encoder(
            inputs_embeds=inputs_embeds,
            token_type_ids=sequence.token_type_ids[:, part],
            position_ids=sequence.position_ids[:, part],
            attention_mask=additive_attention_mask(key_visibility, inputs_embeds.dtype),
            **record_kwargs,
        )

    def _complete_inputs(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        modality_mask: torch.Tensor | None,
        image_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fill in omitted inputs and validate the modality mask; return ids, attention mask and modality mask."""
        if pixel_values is not None and image_features is not None:
            raise ValueError("Give pixel_values or image_features, not both.")
        image_input = pixel_values if image_features is None else image_features
        image_input_name = "pixel_values" if image_features is None else "image_features"
        if input_ids is None and image_input is None:
            raise ValueError("RMT needs input_ids, pixel_values (or image_features) or both; got neither.")
        reference = input_ids if input_ids is not None else image_input
        if isinstance(reference, torch.Tensor) and reference.shape[0] == 0:
            raise ValueError("RMT got an empty batch (batch size 0); give at least one sample.")
        if image_features is not None:
            self._check_image_features(image_features)
        batch_size, device = reference.shape[0], reference.device
        check_batch_sizes(
            input_ids=input_ids,
            attention_mask=attention_mask,
            modality_mask=modality_mask,
            **{image_input_name: image_input},
        )
        if input_ids is not None:
            self._check_token_ids(input_ids)

        if modality_mask is None:
            modality_mask = torch.tensor([image_input is not None, input_ids is not None], device=device)
            modality_mask = modality_mask.expand(batch_size, -1)
        modality_mask = validate_modality_mask(modality_mask, batch_size)
        if image_input is None and modality_mask[:, IMAGE_PRESENT].any():
            raise ValueError("modality_mask marks images as present but pixel_values is missing.")
        if input_ids is None and modality_mask[:, TEXT_PRESENT].any():
            raise ValueError("modality_mask marks text as present but input_ids is missing.")
        if image_features is not None:
            finite = torch.isfinite(image_features).flatten(1).all(dim=1)
            bad_rows = (~finite & modality_mask[:, IMAGE_PRESENT]).nonzero(as_tuple=True)[0].tolist()
            if bad_rows:
                raise ValueError(f"image_features of present images in rows {bad_rows} contain NaN or infinite values.")

        if input_ids is None:
            input_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return input_ids, attention_mask, modality_mask

    def _check_image_features(self, image_features: torch.Tensor) -> None:
        """Raise ValueError unless `image_features` is a float tensor of the shape this model's CNN and pooling give."""
        if not isinstance(image_features, torch.Tensor):
            raise ValueError(f"image_features must be a torch.Tensor, got {type(image_features).__name__}.")
        if not image_features.is_floating_point():
            raise ValueError(f"image_features must be floating point, got {image_features.dtype}.")
        image_encoder = self.embeddings.image_encoder
        expected = (self.config.num_image_embeddings, image_encoder.feature_size)
        if image_features.dim() != 3 or tuple(image_features.shape[1:]) != expected:
            raise ValueError(
                f"image_features must have shape (batch_size, {expected[0]}, {expected[1]}) for "
                f"{self.config.image_model_name} with {expected[0]} image embeddings, "
                f"got {tuple(image_features.shape)}."
            )

    def _check_token_ids(self, input_ids: torch.Tensor) -> None:
        """Raise ValueError for ids outside the vocabulary or text longer than the encoder's position embeddings."""
        vocab_size = self.get_input_embeddings().num_embeddings
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
            raise ValueError(
                f"input_ids contain {input_ids.min().item()}..{input_ids.max().item()}, outside the vocabulary "
                f"[0, {vocab_size}). Use the tokenizer saved with this model."
            )
        max_positions = self.config.text_config.max_position_embeddings
        if input_ids.shape[1] > max_positions:
            raise ValueError(
                f"Text of {input_ids.shape[1]} tokens exceeds the encoder's {max_positions} position embeddings; "
                f"tokenize with truncation=True and max_length <= {max_positions}."
            )


def check_batch_sizes(**inputs: torch.Tensor | None) -> None:
    """Raise ValueError when the given inputs disagree on the batch size (their first dimension)."""
    sizes = {name: tensor.shape[0] for name, tensor in inputs.items() if tensor is not None}
    if len(set(sizes.values())) > 1:
        details = ", ".join(f"{name} {size}" for name, size in sizes.items())
        raise ValueError(f"Inputs disagree on the batch size: {details}.")


def validate_modality_mask(modality_mask: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Return the modality mask as a `(batch, 2)` bool tensor; raise `ValueError` on a bad shape or an empty row."""
    if modality_mask.shape != (batch_size, 2):
        raise ValueError(
            f"modality_mask must have shape (batch_size, 2) = ({batch_size}, 2), got {tuple(modality_mask.shape)}"
        )
    if not ((modality_mask == 0) | (modality_mask == 1)).all():
        raise ValueError(f"modality_mask values must be 0 or 1, got {modality_mask.unique().tolist()}")
    modality_mask = modality_mask.bool()
    empty_rows = (~modality_mask.any(dim=1)).nonzero(as_tuple=True)[0].tolist()
    if empty_rows:
        raise ValueError(f"Rows {empty_rows} of modality_mask have both the image and the text absent.")
    return modality_mask


def routed_tasks(modality_mask: torch.Tensor, use_multitask: bool = True) -> torch.Tensor:
    """Return `(batch,)` indices into `TASKS` of the head that classifies each sample.

    Image-only samples go to the image head, text-only samples to the text head and complete samples to the
    multimodal head. Without multi-task learning the multimodal head classifies every sample.
    """
    image_present = modality_mask[:, IMAGE_PRESENT]
    text_present = modality_mask[:, TEXT_PRESENT]
    image_task, text_task, multimodal_task = (TASKS.index(task) for task in ("image", "text", "multimodal"))
    if not use_multitask:
        return torch.full_like(image_present, multimodal_task, dtype=torch.long)
    unimodal = torch.where(image_present, image_task, text_task)
    return torch.where(image_present & text_present, multimodal_task, unimodal)


def route_logits(
    image_logits: torch.Tensor,
    text_logits: torch.Tensor,
    multimodal_logits: torch.Tensor,
    modality_mask: torch.Tensor,
) -> torch.Tensor:
    """Pick, per sample, the logits of the head that matches the modalities it has."""
    image_present = modality_mask[:, IMAGE_PRESENT, None]
    text_present = modality_mask[:, TEXT_PRESENT, None]
    unimodal = torch.where(image_present, image_logits, text_logits)
    return torch.where(image_present & text_present, multimodal_logits, unimodal)


def multitask_loss(
    task_logits: list[torch.Tensor],
    task_samples: list[torch.Tensor],
    task_weights: list[float],
    labels: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of per-task cross-entropies, each averaged over the samples that task covers.

    A task that covers no sample of the batch adds a zero that still depends on its logits, so every head
    receives a (zero) gradient and distributed training sees the same parameters used on every rank.
    """
    loss = task_logits[0].new_zeros(())
    for logits, samples, weight in zip(task_logits, task_samples, task_weights):
        if weight == 0:
            continue
        if samples.any():
            task_loss = nn.functional.cross_entropy(logits[samples].float(), labels[samples])
        else:
            task_loss = logits.sum() * 0.0
        loss = loss + weight * task_loss
    return loss


class RMTForMultimodalClassification(RMTPreTrainedModel):
    """RMT with one linear head on each CLS: image, text and multimodal.

    Training minimizes the task-weighted sum of three cross-entropies. The image task covers samples with
    an image, the text task samples with text, and the multimodal task samples with both. With
    `config.use_multitask` off only the multimodal head trains; it covers every sample, with the absent
    modality masked, because it is then the head that answers every sample.
    """

    def __init__(self, config: RMTConfig):
        super().__init__(config)
        self.rmt = RMTModel(config)
        self.image_classifier = self._make_head(config)
        self.text_classifier = self._make_head(config)
        self.multimodal_classifier = self._make_head(config)
        self.post_init()

    @staticmethod
    def _make_head(config: RMTConfig) -> nn.Sequential:
        return nn.Sequential(nn.Dropout(config.classifier_dropout), nn.Linear(config.hidden_size, config.num_labels))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        modality_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        image_features: torch.Tensor | None = None,
        routed_only: bool = False,
        **kwargs,
    ) -> RMTClassifierOutput:
        r"""
        Args:
            input_ids, attention_mask, pixel_values, modality_mask, image_features:
                See [`RMTModel.forward`].
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Class ids in `[0, num_labels)`. When given, the multi-task loss is returned.
            routed_only (`bool`, *optional*, defaults to `False`):
                Compute only the routed head of each sample: `logits` is the same as without it, the three head
                logits are None. Batch inference then costs about one joint pass for complete samples and one
                side pass for unimodal ones. The multi-task loss needs every head, so `labels` are refused.
        """
        if routed_only and labels is not None:
            raise ValueError("The multi-task loss needs every head: call with routed_only=False to pass labels.")
        outputs = self.rmt(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            modality_mask=modality_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            image_features=image_features,
            routed_only=routed_only,
        )
        modality_mask = outputs.modality_mask
        if routed_only:
            return RMTClassifierOutput(logits=self._routed_logits(outputs.routed_cls_state, modality_mask))

        image_logits = self.image_classifier(outputs.image_cls_state)
        text_logits = self.text_classifier(outputs.text_cls_state)
        multimodal_logits = self.multimodal_classifier(outputs.multimodal_cls_state)
        if self.config.use_multitask:
            logits = route_logits(image_logits, text_logits, multimodal_logits, modality_mask)
        else:
            logits = multimodal_logits

        loss = None
        if labels is not None:
            loss = self._loss(image_logits, text_logits, multimodal_logits, modality_mask, labels)

        return RMTClassifierOutput(
            loss=loss,
            logits=logits,
            image_logits=image_logits,
            text_logits=text_logits,
            multimodal_logits=multimodal_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def _routed_logits(self, routed_state: torch.Tensor, modality_mask: torch.Tensor) -> torch.Tensor:
        """Apply to each sample's routed CLS state the head of its routed task."""
        routed_task = routed_tasks(modality_mask, self.config.use_multitask)
        heads = (self.image_classifier, self.text_classifier, self.multimodal_classifier)
        logits = routed_state.new_zeros(len(routed_task), self.config.num_labels)
        for task, head in enumerate(heads):
            selected = routed_task == task
            if selected.any():
                logits = logits.index_put((selected.nonzero(as_tuple=True)[0],), head(routed_state[selected]))
        return logits

    def _loss(
        self,
        image_logits: torch.Tensor,
        text_logits: torch.Tensor,
        multimodal_logits: torch.Tensor,
        modality_mask: torch.Tensor,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        image_present = modality_mask[:, IMAGE_PRESENT]
        text_present = modality_mask[:, TEXT_PRESENT]
        labels = labels.to(multimodal_logits.device).long()
        if not self.config.use_multitask:
            return multitask_loss([multimodal_logits], [torch.ones_like(image_present)], [1.0], labels)
        return multitask_loss(
            [image_logits, text_logits, multimodal_logits],
            [image_present, text_present, image_present & text_present],
            self.config.task_weights,
            labels,
        )

    @classmethod
    def from_backbones(cls, config: RMTConfig, **text_model_kwargs) -> "RMTForMultimodalClassification":
        """Build RMT on pretrained backbones: the encoder from `config.text_model_name_or_path`, and the CNN
        from timm's ImageNet weights when `config.image_pretrained` is set.

        `text_model_kwargs` go to `AutoModel.from_pretrained` (e.g. `local_files_only=True`). The RMT parts
        (CLS embeddings, image projection, heads) start from random initialization.
        """
        model = cls(config)
        model.load_pretrained_text_encoder(**text_model_kwargs)
        if config.image_pretrained:
            model.load_pretrained_image_backbone()
        return model

    def load_pretrained_text_encoder(self, **text_model_kwargs) -> None:
        """Copy the weights of `config.text_model_name_or_path` into the encoder; its pooler is not used."""
        name = self.config.text_model_name_or_path
        pretrained_encoder = AutoModel.from_pretrained(name, **text_model_kwargs)
        missing, unexpected = self.rmt.encoder.load_state_dict(pretrained_encoder.state_dict(), strict=False)
        unexpected = [key for key in unexpected if not key.startswith("pooler.")]
        if missing or unexpected:
            raise ValueError(
                f"Encoder weights of {name!r} do not match config.text_config: missing {missing}, "
                f"unexpected {unexpected}. Build text_config from that model's config."
            )

    def load_pretrained_image_backbone(self) -> None:
        """Copy timm's pretrained weights of `config.image_model_name` into the CNN (downloads them)."""
        name = self.config.image_model_name
        try:
            backbone = timm.create_model(name, pretrained=True, num_classes=0, global_pool="")
        except Exception as error:  # timm raises several types for network, hub and missing-weight failures
            raise RuntimeError(
                f"Could not load pretrained timm weights for {name!r} ({type(error).__name__}: {error}). "
                "Offline, set image_pretrained=False to start the CNN from random weights."
            ) from error
        self.rmt.embeddings.image_encoder.backbone.load_state_dict(backbone.state_dict())

RMTModel.register_for_auto_class("AutoModel")
RMTForMultimodalClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "RMTClassifierOutput",
    "RMTForMultimodalClassification",
    "RMTModel",
    "RMTModelOutput",
    "RMTPreTrainedModel",
    "route_logits",
    "routed_tasks",
]
