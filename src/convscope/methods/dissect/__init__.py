"""Network Dissection: label every unit of a layer with the concept its top activations segment best.

Bau, Zhou, Khosla, Oliva & Torralba, "Network Dissection: Quantifying Interpretability of Deep Visual
Representations", CVPR 2017; the survey's Sec. 6.2.1, Eq. 18-19.  As in NetDissect-Lite's pipeline
(extract -> quantile -> tally -> report) the work is split in stages, each a plain function of tensors, with the
configuration passed explicitly in a frozen :class:`DissectConfig`:

1. **quantile** (:func:`unit_thresholds`, Eq. 18): the threshold ``T_f`` of every unit ``f`` with
   ``P(a_f > T_f) = quantile`` over all spatial positions of all images, at the layer's own resolution.  The
   result is *exact*: per unit only the ``k = n - floor((n - 1)(1 - quantile))`` largest values are kept (``n`` =
   images x positions), and ``T_f`` is interpolated from them exactly as ``numpy.quantile(a_f, 1 - quantile)``
   (``method="linear"``, NumPy's default, the one NetDissect-Lite's ``np.percentile`` uses).  Per batch only the
   values above each unit's current k-th largest (a lower bound of the final one) are kept, as (unit, value)
   pairs, and merged into the buffer once some unit has about ``k / 2`` waiting.  Memory: ``units x k x 4``
   bytes per layer, i.e. about ``quantile`` of the layer's activations over the whole dataset
   (``DissectConfig.max_buffer_mb`` caps it, with an error naming the fix).  For 1000 images of 56 x 56
   positions that is 15 681 floats per unit.
2. **tally** (:func:`tally_batch`, Eq. 19): each unit's map is upsampled bilinearly to the label resolution and
   thresholded, ``M_f = S_f > T_f``; for all units and all concepts at once we accumulate the intersections
   ``|M_f & L_c|``, the activated pixels ``|M_f|`` and the concept pixels ``|L_c|``.  Sparse and exact: an
   upsampled pixel is a convex combination of four cells, so only the output blocks around cells above ``T_f``
   (a few per cent) are interpolated (float64); a block whose labels are uniform adds its count to its label
   combination, and only blocks on label boundaries are counted pixel by pixel (one ``bincount`` over
   ``unit x label combination``, whatever the number of concepts or label layers).  Image-level labels (Broden's
   scenes) are whole-image masks and count through one ``units x images @ images x concepts`` product.
3. **IoU**: ``IoU_{f,c} = sum |M_f & L_c| / sum |M_f | L_c|``.  As in the authors' released code, the sums for a
   concept run over the images that carry annotations of that concept's category: ``|M_f|`` is only counted on
   images that have some label of that category (an image without texture labels says nothing about texture
   detectors).  NetDissect-Lite's ``tally_units_cat`` is slightly narrower: it counts an image's activated
   pixels for a category only when they overlap some label of that category in that image.  A unit is a
   *detector* of its best concept when ``IoU > iou_threshold`` (0.04).

Scale: memory is bounded by the batch (plus the exact quantile buffers): each layer's output is consumed inside its
forward hook, so only one layer's activations are alive at a time; images load in DataLoader workers while the model
runs; progress bars; with ``out=`` the pass-1 buffers / thresholds and the pass-2 partial counts are
written atomically every ``checkpoint_every`` batches, and a rerun with the same model, data and configuration picks
up where it stopped (a different configuration in the same folder is refused).  With ``executor=`` / ``workers=`` /
``shards=``, both passes run as shard tasks over contiguous batch ranges in local worker processes or on Ray
(:mod:`~convscope.methods.dissect.shards`), merged exactly, each shard saved in ``out`` as it returns.
"""

from .compare import Comparison, compare
from .concepts import BatchLabels, ConceptSpace, batch_labels, concept_space
from .config import DissectConfig
from .quantile import TopBuffer, float32_below
from .results import LayerDissection, UnitLabel, layer_result
from .run import dissect, open_dataset, stream_dataset, unit_thresholds
from .tally import iou_from_counts, tally_batch

__all__ = [
    "BatchLabels",
    "Comparison",
    "ConceptSpace",
    "DissectConfig",
    "LayerDissection",
    "TopBuffer",
    "UnitLabel",
    "batch_labels",
    "compare",
    "concept_space",
    "dissect",
    "float32_below",
    "iou_from_counts",
    "layer_result",
    "open_dataset",
    "stream_dataset",
    "tally_batch",
    "unit_thresholds",
]
