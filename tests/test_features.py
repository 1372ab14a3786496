"""extract/features.py: the feature-name rule and the pooled shape."""

from __future__ import annotations

import pytest

from extract.features import FeatureKey, draw_name, feature_name, parse_feature_name


def test_feature_names_round_trip():
    assert feature_name(90, 24, "avg2") == "t090_b24_avg2"
    assert feature_name(150, 19, ("tok", 16), view="flip") == "t150_b19_tok16_flip"
    assert feature_name(5, 3, "avg1") == "t005_b03_avg1"
    assert parse_feature_name("t150_b19_tok16_flip") == FeatureKey(150, 19, "tok16", "flip")
    for name in ("t090_b24_avg2", "t000_b01_tok8", "t999_b37_avg4_flip", "t1500_b100_avg2"):
        assert feature_name(*parse_feature_name(name)) == name
    for bad in ("t90_b24_avg2", "t090_b24_max2", "t090_b24_avg0", "t090_b24_avg02", "t090_b24_avg2_flipped", "x"):
        with pytest.raises(ValueError):
            parse_feature_name(bad)
    with pytest.raises(ValueError):
        feature_name(90, 24, "avg2", view="mirror")


def test_key_parts_and_shape():
    key = FeatureKey.parse("t090_b24_tok16_flip")
    assert (key.pool_kind, key.pool_size, key.name) == ("tok", 16, "t090_b24_tok16_flip")
    assert key.shape(512, 8) == (512, 8, 8) and key.shape(512, 32) == (512, 16, 16)
    with pytest.raises(ValueError, match="cannot enlarge"):
        FeatureKey(90, 24, "avg4").shape(64, 2)


def test_noise_draw_names():
    assert feature_name(150, 15, "tok8", draw=2) == "t150_b15_tok8_d2"
    assert feature_name(150, 15, "tok8", "flip", 1) == "t150_b15_tok8_flip_d1"
    assert feature_name(150, 15, "tok8", draw=0) == "t150_b15_tok8"  # draw 0 keeps the plain name
    assert parse_feature_name("t150_b15_tok8_flip_d3") == FeatureKey(150, 15, "tok8", "flip", 3)
    assert draw_name("t150_b15_tok8", 3) == "t150_b15_tok8_d3"
    assert draw_name("t150_b15_tok8_d3", 0) == "t150_b15_tok8"
    for bad in ("t150_b15_tok8_d0", "t150_b15_tok8_d01", "t150_b15_tok8_d1_flip", "t150_b15_tok8_d"):
        with pytest.raises(ValueError):
            parse_feature_name(bad)
    with pytest.raises(ValueError, match="draw"):
        feature_name(150, 15, "tok8", draw=-1)
