"""Getting COCO: resumable downloads, safe archive extraction, and the synthetic demo mirror."""
