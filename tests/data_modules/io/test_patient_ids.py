"""Patient ids from file names: every naming scheme of every dataset, and near names that must not match."""

import pytest

from data_modules.io.patient_ids import file_patient_ids, patient_id

LA_ID = "0RZDK210BSMWAA6467LU"


@pytest.mark.parametrize(
    "dataset, path, expected",
    [
        ("synapse", "test_vol_h5/case0001.npy.h5", {"0001"}),
        ("synapse", "train_npz/case0001_slice012.npz", {"0001"}),
        ("synapse", "RawData/Training/img/img0001.nii.gz", {"0001"}),
        ("synapse", "RawData/Training/label/label0001.nii.gz", {"0001"}),
        ("synapse", "nnunet/imagesTr/img0001_0000.nii.gz", {"0001"}),
        ("synapse", "pngs/case0001/slice_004.png", {"0001"}),  # a folder of one patient's slices
        ("demo", "unlabeled/case0101_slice000.npz", {"0101"}),
        ("synapse", "other/case00011.nii.gz", set()),  # five digits: not BTCV's scheme
        ("synapse", "other/0001.nii.gz", set()),
        ("synapse", "other/img0001a.nii.gz", set()),
        ("promise12", "Case07.mhd", {"07"}),
        ("promise12", "TrainingData_Part1/Case07_segmentation.mhd", {"07"}),
        ("promise12", "copy/case07.raw", {"07"}),
        ("promise12", "Case1.mhd", set()),  # not PROMISE12's two digits: neither Case01 nor Case10
        ("promise12", "Case100.mhd", set()),
        ("la", f"2018LA_Seg_Training Set/{LA_ID}/mri_norm2.h5", {LA_ID}),
        ("la", f"Training Set/{LA_ID}/lgemri.nrrd", {LA_ID}),  # the challenge's own release
        ("la", f"slices/{LA_ID}_slice003.npz", {LA_ID, "SLICES"}),
        ("generic", "imagesTr/liver_3.nii.gz", {"liver_3", "imagesTr"}),
        ("generic", "imagesTs/liver_3_0000.nii.gz", {"liver_3_0000", "liver_3", "imagesTs"}),
    ],
)
def test_file_patient_ids(dataset, path, expected):
    assert file_patient_ids(dataset, path) == expected


def test_test_case_ids_and_near_misses():
    assert patient_id("synapse", "case0001") == patient_id("synapse", "img0001.nii.gz") == "0001"
    assert patient_id("synapse", "case00011") is None and patient_id("synapse", "case0011") == "0011"
    assert patient_id("promise12", "Case01") == "01" and patient_id("promise12", "Case10") == "10"
    assert patient_id("promise12", "Case1") is None
    assert patient_id("la", LA_ID.lower()) == LA_ID
    assert patient_id("generic", "liver_1") == "liver_1" != patient_id("generic", "liver_10")
