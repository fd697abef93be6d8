pub mod unet_3d_blocks;
pub mod unet_3d_condition;
