"""DICOM networking: the storage SCP that receives studies (scp), its status codes (status)."""
